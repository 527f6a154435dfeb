# Two commands set everything up on a fresh machine: `make run` and `make test`.
# Each installs what is missing into .venv/ (torch pinned to the CPU wheel on disk),
# generates the gRPC stubs from protos/, and makes the default model offline.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PDSERVE := $(VENV)/bin/pdserve
MODEL := models/default
STAMP := $(VENV)/.stamp-install
PORT ?= 8000

.PHONY: install protos model run test test-fast bench-cpu clean

install: $(STAMP) protos

# torch==2.13.0 and triton==3.8.0 lie on this machine's disk; an unpinned torch would pull a
# multi-GB CUDA build. numpy is listed because Triton's interpreter needs it undeclared.
# NIXL (the ucx connector) installs without its dependencies: its meta package would pull
# torch and both CUDA stacks; nixl-cu13 bundles its own UCX and imports on a CPU.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "torch==2.13.0" "triton==3.8.0" numpy
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test,triton]" --config-settings editable_mode=compat
	$(PY) -m pip install -q --disable-pip-version-check --no-deps "nixl==1.5.1" "nixl-cu13==1.5.1"
	touch $(STAMP)

protos: protos/pdserve_pb2.py

protos/pdserve_pb2.py: protos/pdserve.proto $(STAMP)
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. protos/pdserve.proto

model: $(MODEL)/config.json

$(MODEL)/config.json: | $(STAMP)
	$(PDSERVE) make-model --arch llama --out $(MODEL)

run: install model
	$(PDSERVE) up --model $(MODEL) --port $(PORT) --prefill 1 --decode 1

# Static checks first (seconds; mypy's packages and settings are in pyproject.toml), then the
# suite. The kernel suite runs in a process of its own under Triton's interpreter.
test: install model
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -q
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/kernels

bench-cpu: install model
	$(PY) bench/serving.py --model $(MODEL)

clean:
	rm -rf $(VENV) models protos/*_pb2*.py protos/*_pb2.pyi
