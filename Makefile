PYTHON ?= python

.PHONY: lint format test test-all docs

# CI runs `make lint` and `make test`: lint builds the docs too, warnings as errors
lint: docs
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check pyro_ladder

format:
	$(PYTHON) -m ruff format pyro_ladder tests
	$(PYTHON) -m ruff check --fix .

test:
	$(PYTHON) -m pytest -q

test-all:
	$(PYTHON) -m pytest -q -m "slow or not slow"

# the API reference from the docstrings and the long pages: docs/_build/html/index.html
docs:
	$(PYTHON) -m sphinx -W --keep-going -q -b html docs docs/_build/html
