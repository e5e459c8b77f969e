# ambit: `make lab` runs the lab demo, `make test` the test suite; both run the idempotent `make setup`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# bcc ships only as Debian's python3-bpfcc for the system interpreter, so the venv is built from it.
SYSPY ?= /usr/bin/python3
PYTEST_ARGS ?=

PROTOS := $(wildcard api/*.proto)
NATIVE_SRC := $(wildcard native/src/*.c native/src/*.h) native/build_engine.py

.PHONY: setup system venv native protos test unit lint lab bench clean

setup: system venv protos native

system:
	@bash scripts/setup-system.sh

$(VENV)/.installed: pyproject.toml
	@echo "setup: Python environment $(VENV) (pinned dependencies from pyproject.toml)"
	@test -x $(PY) || $(SYSPY) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -e '.[dev]'
	@# bcc's Python bindings live in Debian's dist-packages; appended last so the venv's pins win.
	@echo /usr/lib/python3/dist-packages > $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_debian_bcc.pth
	@touch $@

venv: $(VENV)/.installed

api/.built: $(PROTOS) $(VENV)/.installed
	@echo "setup: generating gRPC code from $(PROTOS)"
	@if [ -n "$(PROTOS)" ]; then $(PY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. $(PROTOS); fi
	@touch $@

protos: api/.built

native/.built: $(NATIVE_SRC) $(VENV)/.installed
	@echo "setup: building the C engine (native/)"
	@$(PY) native/build_engine.py
	@touch $@

native: native/.built

test: setup
	@bash scripts/run-tests.sh $(PYTEST_ARGS)

unit: setup
	@$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

lint: setup
	@$(VENV)/bin/ruff check agent mgmt api native tests
	@$(VENV)/bin/mypy agent mgmt native

lab: setup
	@$(VENV)/bin/ambit lab demo

bench: setup
	@$(PY) -m tests.bench

clean:
	rm -rf $(VENV) api/.built native/.built native/_engine* native/src/*.o build *.egg-info
