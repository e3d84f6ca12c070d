# Two commands a user needs: `make demo` (the main job on the embedded synthetic cohort) and `make test`.
# Both create .venv on first use; it is brought up to date whenever setup.cfg changes.
PYTHON ?= python3
VENV   ?= .venv
STAMP  := $(VENV)/.installed-$(shell $(PYTHON) -c "import hashlib; print(hashlib.sha1(open('setup.cfg','rb').read() + open('pyproject.toml','rb').read()).hexdigest()[:12])")

.PHONY: install demo test bench

$(STAMP):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "braindino needs Python >= 3.10; run make PYTHON=python3.11 ...")'
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV) || { echo "could not create $(VENV): on Debian/Ubuntu install python3-venv"; exit 1; }
	$(VENV)/bin/python -m pip install --upgrade pip
	$(VENV)/bin/python -m pip install -e ".[test]"
	touch $@

install: $(STAMP)

demo: install
	$(VENV)/bin/braindino demo --out demo

test: install
	$(VENV)/bin/python -m pytest -q

bench: install
	$(VENV)/bin/python bench/run_all.py
