# Every target installs what it needs: a fresh machine only needs Python 3.11.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# These releases install from local files on our machines; elsewhere pip downloads them.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: install test demo retrain-e2e bench lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

demo: install
	PATH="$(CURDIR)/$(BIN):$$PATH" bash launch/demo.sh

retrain-e2e: install
	PATH="$(CURDIR)/$(BIN):$$PATH" bash launch/retrain-e2e.sh

bench: install
	$(BIN)/ssl-dist bench loader
	$(BIN)/ssl-dist bench loss
	$(BIN)/ssl-dist bench train

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf work bench-results .pytest_cache .mypy_cache .ruff_cache
