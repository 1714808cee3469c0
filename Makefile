# `make demo` and `make test` create (or reuse) the dev environment, then run.
PY := .venv/bin/python
ENV := scripts/dev-env.sh

.PHONY: env demo test test-fast bench docs clean

env:
	@$(ENV) >/dev/null

demo: env
	$(PY) -m captum_gim demo --out results/demo

test: env
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: env
	$(PY) -m pytest -q -m "not slow" -p no:cacheprovider

bench: env
	$(PY) benchmarks/overhead.py

clean:
	rm -rf results docs/_build .pytest_cache
