# Two commands a user needs: `make demo` (the main job on the embedded synthetic cohort) and `make test`.
# Both create .venv on first use; it is brought up to date whenever setup.cfg changes.
PYTHON ?= python3
VENV   ?= .venv
STAMP  := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml | sha1sum | cut -c1-12)

.PHONY: install demo test bench

$(STAMP):
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --upgrade pip
	$(VENV)/bin/python -m pip install -e ".[test]"
	touch $@

install: $(STAMP)

demo: install
	$(VENV)/bin/braindino demo --out demo

test: install
	$(VENV)/bin/python -m pytest -q

bench: install
	$(VENV)/bin/python bench/bench_store.py
