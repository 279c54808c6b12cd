# Set-up and checks. `make serve` and `make test` are the only two commands a new machine needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTO_FILES := $(wildcard protos/verispec/v1/*.proto)
PROTOC = PATH="$(CURDIR)/$(BIN):$$PATH" $(PY) -m grpc_tools.protoc -Iprotos --python_out=$(1) --grpc_python_out=$(1) \
	--mypy_out=$(1) --mypy_grpc_out=$(1) $(PROTO_FILES)

.PHONY: serve test lint typecheck proto-check buf-check protos unit bench clean

serve: $(STAMP)
	$(BIN)/verispec serve $(ARGS)

test: $(STAMP) lint typecheck proto-check buf-check
	$(BIN)/pytest -m "not gpu" $(PYTEST_ARGS)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned to its CPU build: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check service clients tests
	$(BIN)/ruff format --check service clients tests

typecheck: $(STAMP)
	$(BIN)/mypy

protos: $(STAMP)
	$(call PROTOC,service)

proto-check: $(STAMP)
	@tmp=$$(mktemp -d) && $(call PROTOC,$$tmp) && \
	  diff -r -x __init__.py -x __pycache__ $$tmp/verispec/v1 service/verispec/v1 \
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
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
