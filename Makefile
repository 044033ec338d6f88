# The README's two commands: `make demo` and `make test`. Both run the set-up first.
PY := .venv/bin/python

.PHONY: setup demo test test-slow lint format

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m ohem_d2.demo --output-dir output/demo

test: setup
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

lint: setup
	$(PY) -m ruff check .

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .
