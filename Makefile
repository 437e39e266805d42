# The two commands README.md starts with: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint venv system-packages-demo system-packages-test

$(BIN)/saia: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

venv: $(BIN)/saia

# Debian packages (root only; otherwise it says what is missing): the demo's throw-away
# cluster and sshd; the tests add PostgreSQL and chromium.
system-packages-demo: venv
	$(BIN)/python -m saia.sandbox.packages --for demo

system-packages-test: venv
	$(BIN)/python -m saia.sandbox.packages --for test

demo: venv system-packages-demo
	$(BIN)/saia demo $(ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

test: venv system-packages-test lint
	$(BIN)/pytest
