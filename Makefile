# Two commands do everything on a fresh machine: `make demo` and `make test`.
.PHONY: setup demo test lint bench bench-full schema

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/reportgen run specs/demo.yaml

test: setup
	.venv/bin/python -m pytest -q -n auto --maxprocesses 4

lint: setup
	.venv/bin/ruff check reportgen tests benchmarks scripts

bench: setup
	.venv/bin/python benchmarks/run_all.py --quick

bench-full: setup
	.venv/bin/python benchmarks/run_all.py --full

schema: setup
	.venv/bin/reportgen schema -o reportgen-spec.schema.json
