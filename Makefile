# libra-megatron: `make demo` and `make test` each set up .venv (if needed) and run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# CPU build of torch from the local wheel folder; override on GPU machines (e.g. TORCH_SPEC="torch==2.11.0").
TORCH_SPEC ?= torch==2.13.0
MCORE_SPEC ?= megatron-core==0.19.2
PYTEST_ARGS ?=

STAMP_DEPS := $(VENV)/.deps-installed
STAMP_EXT  := $(VENV)/.ext-built
STAMP_LINT := $(VENV)/.lint-installed

.PHONY: demo test lint install ext clean-ext help

help:
	@echo "make demo   - set up .venv, then run the end-to-end CPU demo"
	@echo "make test   - set up .venv, then run the whole test suite"
	@echo "make lint   - ruff (lint + import order, configured in pyproject.toml) over the repository"
	@echo "make install- only set up .venv (deps, megatron-core, editable install + C++ extension)"

$(PY):
	$(PYTHON) -m venv $(VENV)

# megatron-core >= 0.17 declares Python >= 3.12 but its `megatron.core` runs on 3.11: install it without
# its dependency resolution there (see docs/design.md). triton is imported unconditionally by 0.19.x.
$(STAMP_DEPS): $(PY) requirements.txt
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -r requirements.txt
	@if $(PY) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)'; then \
		$(PIP) install -q "$(MCORE_SPEC)"; \
	else \
		$(PIP) install -q --no-deps --ignore-requires-python "$(MCORE_SPEC)" && $(PIP) install -q triton==3.9.0; \
	fi
	touch $@

$(STAMP_EXT): $(STAMP_DEPS) setup.py $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h)
	flock $(VENV)/.build-lock $(PIP) install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import libra_megatron._C"
	touch $@

# ruff is a dev tool: pinned in requirements-dev.txt, installed into .venv on first `make lint`
$(STAMP_LINT): $(PY) requirements-dev.txt
	$(PIP) install -q -r requirements-dev.txt
	touch $@

lint: $(STAMP_LINT)
	$(PY) -m ruff check .

install: $(STAMP_EXT)

ext: $(STAMP_EXT)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install
	$(PY) -m libra_megatron.demo

clean-ext:
	rm -f libra_megatron/_C*.so $(STAMP_EXT)
	rm -rf build
