# ambit: `make lab` runs the lab demo, `make test` the test suite; both run the idempotent `make setup`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# bcc ships only as Debian's python3-bpfcc for the system interpreter, so the venv is built from it.
SYSPY ?= /usr/bin/python3
PYTEST_ARGS ?=

PROTOS := $(wildcard api/*.proto)
NATIVE_SRC := $(wildcard native/src/*.c native/src/*.h) native/build_engine.py
GATEWAY_SRC := $(wildcard gateway/native/src/*.c gateway/native/src/*.h) gateway/native/build_gateway.py \
	native/src/util.c native/src/internal.h

# `make lab KUBE=1`: the same demo with workloads and policies from a real Kubernetes API server.
KUBE ?=

.PHONY: setup system venv native gateway protos kube test unit lint lab bench clean

setup: system venv protos native gateway kube

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

# The gateway's data plane (llhttp from Debian's node-llhttp sources, libmodsecurity, OpenSSL).
gateway/native/.built: $(GATEWAY_SRC) $(VENV)/.installed
	@$(PY) gateway/native/build_gateway.py
	@touch $@

gateway: gateway/native/.built

# kube-apiserver, etcd and kubectl for the tests and `make lab KUBE=1`: built once per version, cached
# outside the clone (a cold build takes 6-13 minutes; the script prints its progress).
kube:
	@bash scripts/build-kube.sh >/dev/null
	@bash scripts/gateway-api-crds.sh >/dev/null

test: setup
	@bash scripts/run-tests.sh $(PYTEST_ARGS)

unit: setup
	@$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

lint: setup
	@$(VENV)/bin/ruff check agent mgmt api native gateway tests
	@$(VENV)/bin/mypy agent mgmt native gateway

lab: setup
	@$(VENV)/bin/ambit lab demo $(if $(KUBE),--kube)

bench: setup
	@$(PY) -m tests.bench

clean:
	rm -rf $(VENV) api/.built native/.built native/_engine* native/src/*.o gateway/native/.built gateway/native/_gateway* build *.egg-info

# helm for the chart tests (deploy/helm/ambit): built from the Go module proxy, cached outside the clone.
setup: helm
.PHONY: helm image
helm:
	@bash scripts/install-helm.sh >/dev/null

# The ambit image (Dockerfile) with docker, podman or buildah; a clear message when none can build.
image:
	@bash scripts/build-image.sh
