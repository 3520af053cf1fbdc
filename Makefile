# Glimpse — the two commands a user needs are `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PYTHON ?= python3

.PHONY: install serve test lint protos clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e '.[test]'
	touch $@

install: $(VENV)/.installed

protos: install
	$(PY) -m protos.build

serve: install
	$(VENV)/bin/glimpse serve $(ARGS)

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest tests $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info
