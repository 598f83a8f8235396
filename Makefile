# Two commands. Each sets up .venv first when it is missing or stale (the stamp is keyed to
# the hash of pyproject.toml and constraints.txt): the CPU torch 2.13.0 first, so pip never
# pulls a multi-GB CUDA build, then dbl_scale with its dev extra, pinned by constraints.txt.
#   make demo    the main job: ShapesCaptions, triplet vs DBL on 2 CPU ranks, compared
#   make test    the test suite (ARGS="-k resume" passes options to pytest)
PYTHON ?= python3
VENV := .venv
HASH := $(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(HASH)

.PHONY: demo test venv
demo: $(STAMP)
	$(VENV)/bin/dbl-scale demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q --durations=15 $(ARGS)

venv: $(STAMP)

$(STAMP):
	@rm -f $(VENV)/.installed-*
	@[ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet "torch==2.13.0"
	$(VENV)/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	@touch $@
