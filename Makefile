# The one place torch is pinned: a plain `torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT ?= outputs/demo

.PHONY: install demo test test-fast toy-world bench clean

$(BIN)/wandistiller: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e ".[dev]"
	touch $@

install: $(BIN)/wandistiller

demo: install
	$(BIN)/wandistiller demo --output-dir $(OUT)

# Retrain the committed toy-world teacher (data/toy_world) from scratch; resumable (outputs/toy_world.work).
# Every CPU benchmark in one run; their ratio tables go to benchmarks/results.md (~10-15 min on 2 cores).
bench: install
	$(BIN)/python benchmarks/run_all.py

toy-world: install
	$(BIN)/wandistiller make-toy-world outputs/toy_world --work-dir outputs/toy_world.work
	@echo "review outputs/toy_world.work/log.jsonl, then replace data/toy_world with outputs/toy_world"

# The notebooks write into a scratch folder of the test run's own, never into outputs/notebooks.
NB_SCRATCH := outputs/test-notebooks

test: install
	rm -rf $(NB_SCRATCH)
	WANDISTILLER_OUTPUT_DIR=$(abspath $(NB_SCRATCH)) $(BIN)/python -m pytest tests $(wildcard notebooks/*.ipynb) --nbval-lax -q

test-fast: install
	$(BIN)/python -m pytest tests -q -m "not slow and not browser"

clean:
	rm -rf $(VENV) outputs
