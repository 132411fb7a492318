# steelfusion — see README.md. `make demo` and `make test` install what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# User-mode Linux guests (tests/test_vm.py, `steelfusion vm`): installed only when root
VM_DEBS := $(if $(filter 0,$(shell id -u)),user-mode-linux mmdebstrap,)
DEBS := python3-venv libiscsi-bin qemu-utils e2fsprogs tgt iproute2 libfuse3-3 chromium chromium-driver $(VM_DEBS)
PYTEST_ARGS ?=

.PHONY: install debs venv demo test test-fast test-vm lint bench sim clean

install: debs venv

# Debian packages: real initiators (libiscsi-bin, qemu-utils), mkfs (e2fsprogs), tgt for the
# side-by-side benchmark, libfuse3-3 for the lab's failing Journal disk (steelfusion/faultdisk.py).
# Installed when missing and we are root; otherwise say what to install.
debs:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "missing Debian packages:$$missing (run: sudo apt-get install$$missing)"; exit 1; fi; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: install
	$(PY) -m steelfusion.cli demo

test: install
	$(PY) -m ruff check .
	$(PY) -m mypy steelfusion core edge witness journal
	$(PY) -m pytest -q $(PYTEST_ARGS)

# everything that starts no process (codecs, state machines, the simulation): under 2 minutes
test-fast: install
	$(PY) -m pytest -q -m "not lab" $(PYTEST_ARGS)

# Linux guests (User-mode Linux): build or reuse the cached image, then the VM tests only.
# Needs root and /dev/net/tun; says why and does nothing otherwise.
test-vm: install
	@if [ "$$(id -u)" != 0 ] || [ ! -c /dev/net/tun ]; then \
	  echo "test-vm skipped: needs root and /dev/net/tun"; exit 0; fi; \
	$(PY) -m steelfusion.cli vm build && STEELFUSION_VM_LONG=1 $(PY) -m pytest -q -rs -m vm $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check .
	$(PY) -m mypy steelfusion core edge witness journal

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache .mypy_cache .hypothesis

# make sim SEEDS=100000 (write path) ; make sim SEEDS=20000 FULL=1 (journal, Witness, drills)
SEEDS ?= 100000
FULL ?=
sim: install
	$(PY) -m steelfusion.cli sim --seeds $(SEEDS) $(if $(FULL),--full,)

bench: install
	$(PY) -m steelfusion.cli bench
