# The README's two commands: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: serve test constraints

# Installed from constraints.txt (pip and the build backend too), so every machine and CI test the same
# releases; remade whenever it or the declared dependencies change.
$(BIN)/gateway: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt pip
	$(BIN)/pip install --quiet -c constraints.txt --build-constraint constraints.txt -e '.[test]'
	touch $@

BIND ?= 127.0.0.1:8080

serve: $(BIN)/gateway
	$(BIN)/gateway demo
	$(BIN)/gateway serve --bind $(BIND)

test: $(BIN)/gateway
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# constraints.txt anew: what `.[test,bench]` resolves to today, with the pip and setuptools that install it,
# resolved in a throwaway venv so that nothing installed by hand slips in.
constraints:
	scratch="$$(mktemp -d)" && trap 'rm -rf "$$scratch"' EXIT && \
	$(PYTHON) -m venv "$$scratch" && \
	"$$scratch/bin/pip" install --quiet --upgrade pip && \
	"$$scratch/bin/python" -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")' \
	    >"$$scratch/build-requires.txt" && \
	"$$scratch/bin/pip" install --quiet --upgrade -r "$$scratch/build-requires.txt" && \
	"$$scratch/bin/pip" install --quiet --no-build-isolation -e '.[test,bench]' && \
	{ echo "# Every distribution of a .[test,bench] install, pinned. Made by \`make constraints\`; edit setup.cfg, not this."; \
	  "$$scratch/bin/pip" freeze --all --exclude imaging-gateway; } >"$$scratch/constraints.txt" && \
	mv "$$scratch/constraints.txt" constraints.txt
