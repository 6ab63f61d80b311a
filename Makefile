PYTHON ?= python

.PHONY: lint format test test-all

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check pyro_ladder

format:
	$(PYTHON) -m ruff format pyro_ladder tests
	$(PYTHON) -m ruff check --fix .

test:
	$(PYTHON) -m pytest -q

test-all:
	$(PYTHON) -m pytest -q -m "slow or not slow"
