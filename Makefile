# Every target installs what it needs: a fresh machine only needs Python 3.11.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# These releases install from local files on our machines; elsewhere pip downloads them.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# The lock: exact versions of every package we install (pip constraints; `make lock` remakes it).
LOCK := constraints.txt
PYTEST_ARGS ?=

.PHONY: install lock test test-fast demo retrain-e2e bench lint format clean fashion-mnist

install: $(STAMP)

# Debian's Fashion-MNIST (IDX files under /usr/share/datasets): the methods' learn tests and
# `bench quality` read it. Installed with apt-get when missing (sudo when not root); where that
# is impossible the tests that need it are skipped, saying why.
FMNIST_IDX := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
fashion-mnist:
	@test -f $(FMNIST_IDX) || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q dataset-fashion-mnist; } || \
	  echo "warning: could not install dataset-fashion-mnist: its tests will be skipped" >&2; }

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c $(LOCK) $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -c $(LOCK) -e '.[dev]'
	touch $(STAMP)

# Resolve pyproject.toml afresh in a throwaway venv (with the dev and cloud extras) and write
# every resolved version to the lock. Review the diff before committing.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q --upgrade pip
	.lock-venv/bin/python -m pip install -q $(TORCH_SPEC)
	.lock-venv/bin/python -m pip install -q '.[dev,cloud]'
	{ echo "# ssl-dist lock: exact versions for pip -c / uv pip -c. Made by 'make lock' on Python 3.11"; \
	  echo "# ($$(uname -m)); it constrains only what is installed, so other platforms still resolve."; \
	  .lock-venv/bin/python -m pip freeze --exclude ssl-dist; } > $(LOCK)
	rm -rf .lock-venv

test: install fashion-mnist
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The pure, quick tests (marker `unit`): seconds, no processes, Ray or servers.
# The quick tier: pure in-process tests (no processes, servers or Ray); a test that also carries
# `slow` (a slow parametrization of a unit test) is left to `make test`.
test-fast: install
	$(BIN)/python -m pytest -q -m "unit and not slow"

demo: install
	PATH="$(CURDIR)/$(BIN):$$PATH" bash launch/demo.sh

retrain-e2e: install
	PATH="$(CURDIR)/$(BIN):$$PATH" bash launch/retrain-e2e.sh

bench: install
	$(BIN)/ssl-dist bench loader
	$(BIN)/ssl-dist bench loss
	$(BIN)/ssl-dist bench train

# ruff, mypy, and the layer contract (pyproject's [tool.importlinter]: imports point down).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf work bench-results .pytest_cache .mypy_cache .ruff_cache .import_linter_cache .grimp_cache
