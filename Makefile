# The two set-up commands of the README:
#   make run    install into .venv, then run the whole pipeline on the default recipe and leave the demo up
#   make test   install into .venv, then run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Compiled DeepSpeed ops are cached here (they are built for this CPU type: -march=native).
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/raylm/torch_extensions
PYTEST_ARGS ?=

.PHONY: install run test lint clean
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt scripts/install.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/install.sh
	touch $@

run: install
	$(BIN)/raylm run

test: install
	bash scripts/install-browser.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check cluster pipelines actors serve tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
