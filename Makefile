# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Environments are built once per machine into a cache keyed by the pins (scripts/envs.py).
PY ?= python3
VPY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: env demo test bench clean

env:
	@scripts/system-deps
	@$(PY) scripts/envs.py serve export

demo: env
	@$(VPY) -m shelfsight.app.demo

test: env
	@scripts/run-tests $(PYTEST_ARGS)

bench: env
	@$(VPY) bench/run_all.py

clean:
	rm -rf build .pytest_cache
