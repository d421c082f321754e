# The README's two commands: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: serve test

$(BIN)/gateway: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

serve: $(BIN)/gateway
	$(BIN)/gateway demo
	$(BIN)/gateway serve --bind 127.0.0.1:8080

test: $(BIN)/gateway
	$(BIN)/python -m pytest $(PYTEST_ARGS)
