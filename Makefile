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

# --- deployment (deploy/README.md): make up [MODEL=DIR] [TP=N] [ENCODERS=N] [DEVICE=cpu]
MODEL ?=
TP ?= 1
ENCODERS ?= 1
DEVICE ?= gpu
SERVED_MODEL ?= $(if $(MODEL),$(notdir $(patsubst %/,%,$(MODEL))),glimpse-demo)
COMPOSE_FILES := -f deploy/docker-compose.yml $(if $(filter cpu,$(DEVICE)),-f deploy/docker-compose.cpu.yml)
COMPOSE = $(if $(MODEL),MODEL_DIR=$(abspath $(MODEL)) )TP=$(TP) ENCODERS=$(ENCODERS) SERVED_MODEL=$(SERVED_MODEL) docker compose $(COMPOSE_FILES)

.PHONY: up down logs

up:
	$(COMPOSE) up -d --build --wait

down:
	$(COMPOSE) down

logs:
	$(COMPOSE) logs -f --tail=200
