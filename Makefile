# Set-up and checks. `make serve` and `make test` are the only two commands a new machine needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTO_FILES := $(wildcard protos/verispec/v1/*.proto)
NODE_DIR := clients/typescript
NODE_STAMP := $(NODE_DIR)/node_modules/.installed
# Arize Phoenix, a real tracing backend for tests/test_phoenix.py, in its own environment.
PHOENIX_VENV := .venv-phoenix
PHOENIX_STAMP := $(PHOENIX_VENV)/.installed
WHEELS := dist/wheels
PYTEST := TEST_PHOENIX_EXECUTABLE=$(CURDIR)/$(PHOENIX_VENV)/bin/phoenix VERISPEC_WHEELS=$(CURDIR)/$(WHEELS) $(BIN)/pytest
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_INSTALL := $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends
CLIENT_DIR := clients/python
STUBS_DIR := $(CLIENT_DIR)/verispec_proto/v1
# Python stubs of package verispec.v1 into $(1) under the import name verispec_proto.v1 (the client
# distribution's own name, so that it never shadows the server's `verispec` package): protoc writes
# verispec/v1/*, the generated imports are renamed, the files land flat in $(1).
PY_STUBS = gen=$$(mktemp -d) && PATH="$(CURDIR)/$(BIN):$$PATH" $(PY) -m grpc_tools.protoc -Iprotos \
	--python_out=$$gen --grpc_python_out=$$gen --mypy_out=$$gen --mypy_grpc_out=$$gen $(PROTO_FILES) && \
	sed -i -e 's/^from verispec\.v1 import /from verispec_proto.v1 import /' \
	  -e "s/(DESCRIPTOR, 'verispec\.v1\./(DESCRIPTOR, 'verispec_proto.v1./" $$gen/verispec/v1/*.py $$gen/verispec/v1/*.pyi && \
	mkdir -p $(1) && cp $$gen/verispec/v1/*.py $$gen/verispec/v1/*.pyi $(1)/ && rm -r $$gen

.PHONY: serve test test-tracing tools lint typecheck proto-check buf-check protos node-client wheels unit bench clean

serve: $(STAMP)
	$(BIN)/verispec serve $(ARGS)

test: $(STAMP) $(PHOENIX_STAMP) tools lint typecheck proto-check buf-check node-client wheels
	$(PYTEST) -m "not gpu" $(PYTEST_ARGS)

# The tracing-backend test alone: Phoenix shows a request's draft and verify spans.
test-tracing: $(STAMP) $(PHOENIX_STAMP)
	$(PYTEST) -m tracing_backend -s tests/test_phoenix.py

$(STAMP): pyproject.toml $(CLIENT_DIR)/pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned to its CPU build: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	# The client distribution (stubs and client) first: the server depends on it.
	$(PY) -m pip install --quiet -e $(CLIENT_DIR)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Programs the tests run for real: Debian's Prometheus server and promtool, Node.js for the TypeScript stubs.
tools:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { $(APT_INSTALL) prometheus; }
	@command -v node >/dev/null && command -v npm >/dev/null || { $(APT_INSTALL) nodejs npm; }

$(PHOENIX_STAMP):
	test -d $(PHOENIX_VENV) || $(PYTHON) -m venv $(PHOENIX_VENV)
	$(PHOENIX_VENV)/bin/python -m pip install --quiet arize-phoenix==20.26.1
	touch $(PHOENIX_STAMP)

lint: $(STAMP)
	$(BIN)/ruff check service clients tests
	$(BIN)/ruff format --check service clients tests

typecheck: $(STAMP)
	$(BIN)/mypy

$(NODE_STAMP): $(NODE_DIR)/package-lock.json
	npm ci --prefix $(NODE_DIR) --no-audit --no-fund
	touch $(NODE_STAMP)

# Python stubs through grpcio-tools; other languages through buf.gen.yaml (local plugins).
protos: $(STAMP) $(NODE_STAMP)
	$(call PY_STUBS,$(STUBS_DIR))
	$(BIN)/buf generate

# The two Python distributions, as an image or a client service installs them: verispec-client (stubs,
# client, CLI; grpcio/protobuf/googleapis-common-protos only) and verispec (the server, which needs it).
# tests/test_client_dist.py installs the client wheel from here into a fresh venv.
wheels: $(STAMP)
	rm -rf $(WHEELS)
	$(PY) -m pip wheel --quiet --no-deps --no-build-isolation -w $(WHEELS) $(CLIENT_DIR) .
	@ls $(WHEELS)

node-client: $(NODE_STAMP)
	$(NODE_DIR)/node_modules/.bin/tsc -p $(NODE_DIR)

proto-check: $(STAMP) $(NODE_STAMP)
	@tmp=$$(mktemp -d) && $(call PY_STUBS,$$tmp/py) && $(BIN)/buf generate -o $$tmp && \
	  diff -r -x __init__.py -x __pycache__ $$tmp/py $(STUBS_DIR) && \
	  diff -r $$tmp/$(NODE_DIR)/src/gen $(NODE_DIR)/src/gen \
	  && echo "generated code is fresh" \
	  || { echo "generated code is stale: run 'make protos' and commit"; exit 1; }

buf-check: $(STAMP)
	$(BIN)/buf lint
	$(BIN)/buf format --diff --exit-code
	@# Breaking-change check against the previous commit (skipped where it has no contract yet).
	@if git rev-parse -q --verify 'HEAD~1^{commit}' >/dev/null && git cat-file -e HEAD~1:buf.yaml 2>/dev/null; then \
	  $(BIN)/buf breaking --against '.git#ref=HEAD~1' && echo "buf breaking: compatible with HEAD~1"; \
	else echo "buf breaking: skipped, HEAD~1 has no buf module"; fi

bench: $(STAMP)
	$(BIN)/verispec bench $(ARGS)

clean:
	rm -rf $(VENV) $(PHOENIX_VENV) .mypy_cache .ruff_cache .pytest_cache $(NODE_DIR)/node_modules $(NODE_DIR)/dist
