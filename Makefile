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

# HTML with warnings as errors (-E: every page re-read, so no warning hides in a cache),
# then every example in the pages and docstrings (sphinx.ext.doctest).
docs: env
	$(PY) -m sphinx -W --keep-going -E -b html docs docs/_build/html
	$(PY) -m sphinx -W --keep-going -E -b doctest docs docs/_build/doctest

clean:
	rm -rf results docs/_build .pytest_cache
