# qsnap: `make demo` and `make test` are the two commands. Both prepare the host
# themselves (tools/host_setup.sh: apt packages, venv, libvirtd) idempotently.
VENV    := .venv
PY      := $(VENV)/bin/python
PYTEST  := $(PY) -m pytest
SHELL   := /bin/bash

.PHONY: help setup test lint unit functional bench bench-backup demo clean

help:
	@echo "make demo        the main job end to end in one process (boot, snapshot while writing, delete, check)"
	@echo "make test        host setup + lint + unit + functional (real libvirt/QEMU guest, GlusterFS, RabbitMQ)"
	@echo "make unit        fast tests only (no daemons)"
	@echo "make functional  real-peer tests, then the leftover check"
	@echo "make lint        ruff + mypy + the import-layer contract (tools/check_imports.py)"
	@echo "make bench       benchmark scripts (ratios against in-run baselines)"
	@echo "make bench-backup  issue 7's backup figures in one run (full/incr/restore, vs Cinder, 10 at once)"

setup:
	@tools/host_setup.sh

test: setup
	@$(MAKE) --no-print-directory lint unit functional

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	MYPYPATH=tools $(VENV)/bin/mypy --strict tools/check_imports.py tools/import_contract.py
	$(PY) tools/check_imports.py

unit: setup
	$(PYTEST) -q -m "not functional" --timeout=300

# One run id for pytest and the leftover audit that follows it in a separate process.
functional: setup
	@rid=$$(date +%s)$$RANDOM; export QSNAP_BED_RUN=$$rid; \
	$(PYTEST) -q -m functional --timeout=600 -p no:cacheprovider --durations=20; rc=$$?; \
	$(PY) -m testbed.leftovers $$rid || rc=1; exit $$rc

bench: setup
	@for b in bench/*.py; do echo "== $$b"; PYTHONPATH=. $(PY) $$b || exit 1; done

# The backup figures in one run: vs the nbdcopy|zstd pipe and qemu-img convert, vs Cinder's
# PosixBackupDriver on the same 4 GiB volume, 10 volumes at once.
bench-backup: setup
	@for b in backup_full backup_cinder backup_parallel; do echo "== bench/$$b.py"; \
	PYTHONPATH=. $(PY) bench/$$b.py || exit 1; done

# One process: qsnap-api + agent on fake://, a 3-disk TCG guest; cleans up after itself.
demo: setup
	@PYTHONPATH=. $(PY) -m demo

clean:
	rm -rf $(VENV) .tox .mypy_cache .ruff_cache .pytest_cache .hypothesis
