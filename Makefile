# One virtualenv for everything; `make setup` is the only install step CI and README need.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup browser test tiny lint clean

setup: $(BIN)/picochat

$(BIN)/picochat: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/picochat

# The workbench's browser tests drive Debian's chromium through chromium-driver; installed here when missing
# (apt, as root or with sudo). Without them those tests are skipped, with the reason.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  echo "installing chromium + chromium-driver for the browser tests of picochat web"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  export DEBIAN_FRONTEND=noninteractive; \
	  $$SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null 2>&1 && \
	    $$SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null 2>&1; } || \
	  echo "could not install chromium: the browser tests will be skipped"; \
	fi

# Two worker processes, one test file each at a time (module fixtures are built once): CI's two cores.
test: setup browser
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

tiny: setup
	$(BIN)/picochat run tiny --dataset-pack examples/tiny_pack/dataset_pack.json --out-dir runs/tiny --overwrite

lint: setup
	$(BIN)/ruff check picochat_jax tests tools

clean:
	rm -rf runs .pytest_cache
