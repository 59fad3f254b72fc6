# Thin wrappers; the README names `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: install run test lint proto bench-smoke bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[all,dev]'
	touch $@

install: $(VENV)/.installed

run: install  ## the gRPC service with embedded defaults: 127.0.0.1:50051, store ./store
	$(VENV)/bin/embcomp serve

test: install  ## the whole test suite
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check embcomp bench tests
	$(VENV)/bin/mypy embcomp bench

proto: install  ## regenerate embcomp/v1 from proto/
	$(PY) scripts/gen_proto.py

bench-smoke: install
	$(PY) -m bench run bench/sweeps/smoke.yaml --out /tmp/embcomp-bench-smoke

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
