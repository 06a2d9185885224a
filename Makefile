# dbguard — `make demo` and `make test` install what is missing first.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup host venv demo test test-unit vm-test vm-image bench deb clean help

help:
	@echo "make demo   - PostgreSQL under memory pressure, without and with dbguard, side by side"
	@echo "make test   - the whole test suite (unit, integration, end-to-end; needs root)"
	@echo "make vm-test - the cgroup v2 suite in the test VM (builds the VM image on first use)"
	@echo "make bench  - benchmarks (results in benchmarks/RESULTS.md)"
	@echo "make deb    - dist/dbguard_<version>_all.deb (Debian package; docs/install.md)"
	@echo "make setup  - only install Debian packages, kernel headers link and .venv"

setup: host venv

host:
	@bash scripts/setup-host.sh

# The distribution's python3 with system site-packages: BCC (python3-bpfcc) is not on PyPI.
$(VENV)/.installed: pyproject.toml scripts/setup-integrations.sh
	@test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	@$(PY) -m pip install -q -e '.[test]'
	@bash scripts/setup-integrations.sh
	@touch $@

venv: $(VENV)/.installed

demo: setup
	@$(PY) -m lab.demo

test: setup
	@$(PY) -m pytest $(PYTEST_ARGS)

test-unit: venv
	@$(PY) -m pytest tests/unit $(PYTEST_ARGS)

# The cgroup v2 suite, inside the test VM (docs/testing-vm.md); `make test` runs it too.
vm-test: setup
	@$(PY) -m pytest tests/vm $(PYTEST_ARGS)

vm-image: setup
	@DBGUARD_VM_PYTHON=$(PY) bash scripts/vm/build-image.sh

bench: setup
	@$(PY) -m benchmarks.run

deb: host
	@bash scripts/build-deb.sh

clean:
	rm -rf $(VENV) .pytest_cache build dist *.egg-info
