# Two entry points for a fresh machine: `make demo` (the main job on the embedded default model) and
# `make test` (the test suite). Both create or update the local virtual environment idempotently.
PYTHON ?= python3
VENV ?= .venv
# torch first, from pip's configured index (a CPU build where that index serves one; plain PyPI on Linux
# serves the CUDA build). To choose the build explicitly:
#   make TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" install
#   make TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" install
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.cpet-installed
TORCH_STAMP := $(VENV)/.cpet-torch-spec
PY := $(VENV)/bin/python

.PHONY: install demo test clean-venv FORCE

# the torch build asked for is a prerequisite too: a TORCH_SPEC given on the command line (or in the environment)
# that differs from the one installed uninstalls torch, so that the install below puts that build in (pip would
# keep 2.13.0+cpu for "torch==2.13.0 --index-url .../cu128": the local label does not count). The default spec
# is recorded only in a new venv, so a plain `make test` keeps the build chosen before.
$(TORCH_STAMP): FORCE
	@mkdir -p $(VENV)
	@if [ "$(origin TORCH_SPEC)" != "file" ] || [ ! -f $@ ]; then \
	  if ! echo '$(TORCH_SPEC)' | cmp -s - $@; then \
	    if [ -f $@ ] && [ -x $(PY) ]; then $(PY) -m pip uninstall -q -y torch; fi; \
	    echo '$(TORCH_SPEC)' > $@; \
	  fi; \
	fi

# constraints.txt pins every other dependency to the versions the suite last passed with, so that a fresh
# machine (and CI) installs what was tested, whatever PyPI released since; setup.cfg keeps the open ranges.
$(STAMP): setup.cfg setup.py constraints.txt $(TORCH_STAMP)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cpet demo

test: $(STAMP)
	$(PY) -m pytest

clean-venv:
	rm -rf $(VENV)
