# One virtualenv for everything; `make setup` is the only install step CI and README need.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test tiny lint clean

setup: $(BIN)/picochat

$(BIN)/picochat: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/picochat

test: setup
	$(BIN)/python -m pytest -q

tiny: setup
	$(BIN)/picochat run tiny --dataset-pack examples/tiny_pack/dataset_pack.json --out-dir runs/tiny --overwrite

lint: setup
	$(BIN)/ruff check picochat_jax tests tools

clean:
	rm -rf runs .pytest_cache
