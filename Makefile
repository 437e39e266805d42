# The two commands README.md starts with: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint venv system-packages

$(BIN)/saia: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

venv: $(BIN)/saia

# Debian packages for the throw-away cluster, sshd and PostgreSQL (root only; skipped otherwise).
system-packages: venv
	$(BIN)/python -m saia.sandbox.packages

demo: venv system-packages
	$(BIN)/saia demo $(ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: venv system-packages lint
	$(BIN)/pytest
