# `make demo` and `make test` create (or reuse) the dev environment, then run.
PY := .venv/bin/python
ENV := scripts/dev-env.sh

.PHONY: env demo test test-fast test-matrix bench docs clean

env:
	@$(ENV) >/dev/null

demo: env
	$(PY) -m captum_gim demo --out results/demo

# two workers (pytest-xdist): the suite takes about half the time on this 2-core machine
test: env
	$(PY) -m pytest -q -p no:cacheprovider -n 2

test-fast: env
	$(PY) -m pytest -q -m "not slow" -p no:cacheprovider -n 2

# The version matrix (noxfile.py): Python 3.10-3.13 x torch x Captum x transformers x
# pyhealth, each cell a fresh uv environment outside the clone (~/.cache/captum-gim/nox)
# built from uv's shared cache; every cell runs, then the results go to
# docs/support/matrix.json (the docs' table of tested versions).
test-matrix: env
	$(PY) -m nox -f noxfile.py -s cell; status=$$?; \
	$(PY) -m nox -f noxfile.py -s report || status=1; exit $$status

bench: env
	$(PY) benchmarks/overhead.py

# HTML with warnings as errors (-E: every page re-read, so no warning hides in a cache),
# then every example in the pages and docstrings (sphinx.ext.doctest).
docs: env
	$(PY) -m sphinx -W --keep-going -E -b html docs docs/_build/html
	$(PY) -m sphinx -W --keep-going -E -b doctest docs docs/_build/doctest

clean:
	rm -rf results docs/_build .pytest_cache
