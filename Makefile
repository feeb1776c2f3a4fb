# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv and install the package into it.  TORCH is installed in the same
# pip command as everything else so that the resolver never swaps in another build:
# on the project machines torch==2.13.0 is a CPU wheel on local disk; elsewhere pass
# e.g. `make test TORCH=torch` to get your platform's usual build.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)" -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/workbench demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
