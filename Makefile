# Set-up and checks. `make serve` and `make test` are the only two commands a new machine needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTO_FILES := $(wildcard protos/verispec/v1/*.proto)
NODE_DIR := clients/typescript
# The branch whose merge base guards the contract on other branches (buf-check).
CONTRACT_BRANCH ?= main
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

# Programs the tests run for real: Debian's Prometheus server and promtool, Node.js for the TypeScript stubs,
# Go with the protoc-gen-go(-grpc) plugins and the grpc-go / protobuf sources the Go stubs build against offline.
GO_PACKAGES := golang-go protoc-gen-go protoc-gen-go-grpc golang-google-grpc-dev golang-google-protobuf-dev \
	golang-github-golang-protobuf-1-5-dev
tools:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { $(APT_INSTALL) prometheus; }
	@command -v node >/dev/null && command -v npm >/dev/null || { $(APT_INSTALL) nodejs npm; }
	@dpkg -s $(GO_PACKAGES) >/dev/null 2>&1 || { $(APT_INSTALL) $(GO_PACKAGES); }

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

# Python stubs through grpcio-tools; TypeScript and Go through buf.gen.yaml (local plugins).
protos: $(STAMP) $(NODE_STAMP) tools
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

proto-check: $(STAMP) $(NODE_STAMP) tools
	@tmp=$$(mktemp -d) && $(call PY_STUBS,$$tmp/py) && $(BIN)/buf generate -o $$tmp && \
	  diff -r -x __init__.py -x __pycache__ $$tmp/py $(STUBS_DIR) && \
	  diff -r $$tmp/$(NODE_DIR)/src/gen $(NODE_DIR)/src/gen && diff -r $$tmp/clients/go/gen clients/go/gen \
	  && echo "generated code is fresh" \
	  || { echo "generated code is stale: run 'make protos' and commit"; exit 1; }

buf-check: $(STAMP)
	$(BIN)/buf lint
	$(BIN)/buf format --diff --exit-code
	@# The contract is checked against its last release, not its last commit: the newest tag reachable
	@# from HEAD; without one, the merge base with main when HEAD is on another branch; in a repository
	@# with neither, the previous commit. A contract that changed since then needs a CHANGELOG line
	@# that says so (one naming the contract). Skipped where that commit has no buf module yet.
	@base=$$(git describe --tags --abbrev=0 2>/dev/null || true); \
	if [ -z "$$base" ]; then \
	  fork=$$(git merge-base HEAD $(CONTRACT_BRANCH) 2>/dev/null || true); \
	  if [ -n "$$fork" ] && [ "$$fork" != "$$(git rev-parse HEAD)" ]; then base=$$fork; fi; \
	fi; \
	if [ -z "$$base" ] && git rev-parse -q --verify 'HEAD~1^{commit}' >/dev/null; then base=HEAD~1; fi; \
	if [ -z "$$base" ] || ! git cat-file -e "$$base:buf.yaml" 2>/dev/null; then \
	  echo "buf breaking: skipped, no earlier commit with a buf module"; exit 0; fi; \
	$(BIN)/buf breaking --against ".git#ref=$$base" && echo "buf breaking: compatible with $$base" || exit 1; \
	if ! git diff --quiet "$$base" -- protos; then \
	  git diff "$$base" -- CHANGELOG.md | grep -qiE '^\+.*(contract|\.proto)' \
	    && echo "contract changed since $$base: recorded in CHANGELOG.md" \
	    || { echo "the contract changed since $$base: add a CHANGELOG.md line naming the contract change"; exit 1; }; \
	fi

bench: $(STAMP)
	$(BIN)/verispec bench $(ARGS)

clean:
	rm -rf $(VENV) $(PHOENIX_VENV) .mypy_cache .ruff_cache .pytest_cache $(NODE_DIR)/node_modules $(NODE_DIR)/dist
