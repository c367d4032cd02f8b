# The two commands of the README: `make reproduce` and `make test`. Both create .venv on first use.
PY ?= python3
PROFILE ?= quick
VENV := .venv
BIN := $(VENV)/bin

.PHONY: reproduce test install

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

reproduce: $(VENV)/.installed
	$(BIN)/rapo-reproduce --profile $(PROFILE)

test: $(VENV)/.installed
	bash scripts/test.sh
