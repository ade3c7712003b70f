# Two commands for a fresh machine:
#   make run   - install into .venv and start the broker on SQLite with the sample orders
#   make test  - install into .venv (and DCMTK, and PostgreSQL if there is none, via apt-get)
#                and run every test
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install run test lint dcmtk postgresql clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/worklist-broker serve --config config/broker.yaml --load-samples

dcmtk:
	@bash .ci/install-dcmtk

postgresql:
	@bash .ci/install-postgresql

lint: install
	$(BIN)/ruff check .

test: install dcmtk postgresql lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) config/data
