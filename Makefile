# One entry point for setup, the quickstart and the tests (see README.md).
#   make quickstart   set up .venv and run a real LoRA training on the sample data
#   make test         set up .venv and run the test suite (what CI runs)
#   make test-slow    the minutes-long checks the suite leaves out
PYTHON ?= $(shell command -v python3.11 || command -v python3)
TORCH_VERSION ?= 2.13.0
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup browser quickstart test test-slow demo base-model clean

setup: $(VENV)/.installed

# torch first and pinned (the CPU build here; TORCH_VERSION=... to override), so no other package
# pulls a multi-gigabyte CUDA torch; then the project with its test dependencies.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

quickstart: setup
	$(BIN)/finetune train recipes/quickstart.yaml --overwrite
	$(BIN)/finetune sample --base finetune/assets/toyworld-base --lora outputs/quickstart --num-images 4 --steps 25 --guidance 5 \
		--prompt "a large orange star on a gray background, bottom left" --out outputs/quickstart/sample

# Two pytest workers (pytest-xdist), each taking whole test files, so a file's module fixtures (one DDP launch
# for its tests) are made once: CI's 2 cores run the suite in about two thirds of the serial time, much of which
# is interpreters starting, processes launched and the browser waited on. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: setup browser
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The longer checks the default suite leaves out (pytest -m slow): the README's DeepSpeed launch of
# `-m finetune train` (the default suite launches its config with the test worker), a ControlNet learning its control,
# ControlNet under DeepSpeed's optimizer offload (DeepSpeed compiles its CPU Adam first), the real
# `finetune demo` start, a second two-machines-on-loopback run under DeepSpeed, the ZeRO-3 launch, the weight average under DeepSpeed, every recipe
# under DDP and each DeepSpeed config, the DreamBooth and ControlNet Ctrl-C resumes, two processes failing after the stop agreement, as the README lists them.
test-slow: setup
	$(BIN)/python -m pytest -q -m slow -n $(TEST_WORKERS) --dist loadfile

# Headless Chromium for the demo's browser test (Debian packages; needs root, or sudo when there is one).
# Idempotent: nothing happens when /usr/bin/chromium is already installed. Without apt-get (macOS, Fedora) it
# says so and `make test` goes on: the browser test skips where Chromium is missing.
CHROMIUM ?= /usr/bin/chromium
CHROMEDRIVER ?= /usr/bin/chromedriver
browser:
	@if [ ! -x $(CHROMIUM) ] || [ ! -x $(CHROMEDRIVER) ]; then \
		if ! command -v apt-get >/dev/null; then \
			echo "no apt-get here: install chromium and chromedriver as $(CHROMIUM) and $(CHROMEDRIVER) yourself, or the demo's browser test skips"; \
			exit 0; \
		fi; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver; \
	fi

# The browser demo on http://127.0.0.1:7860 (base: the shipped toy-world base, else a tiny model).
demo: setup
	$(BIN)/finetune demo --adapters outputs

# Regenerate the shipped toy-world base model from nothing (about 1.75 hours on 2 CPU cores):
# world data -> random init -> VAE (recipes/pretrain_vae.yaml) -> UNet + text encoder
# (recipes/pretrain_unet.yaml, recipes/pretrain_unet_2.yaml, fp16 copy, recipes/pretrain_unet_3.yaml
# with partial captions) -> fp16 copy in finetune/assets/toyworld-base (replacing the shipped one).
# Data already written is kept, and so is each stage's trained pipeline: run again after a stop (Ctrl-C, a
# reboot), it skips the finished stages and continues the stopped one from its last checkpoint (--resume
# latest starts a stage afresh where it has none). To train again from nothing, remove outputs/base first.
base-model: setup
	test -f outputs/world/all/metadata.jsonl || $(BIN)/finetune make-world-data outputs/world/all --include-held-out all --num-images 10000 --seed 1
	test -f outputs/world/train/metadata.jsonl || $(BIN)/finetune make-world-data outputs/world/train --num-images 20000 --seed 0
	test -f outputs/world/train_partial/metadata.jsonl || \
		$(BIN)/finetune make-world-data outputs/world/train_partial --num-images 20000 --seed 0 --partial-captions 0.3
	test -f outputs/base/init/model_index.json || $(BIN)/finetune make-tiny-model outputs/base/init --preset world --seed 0
	test -f finetune/assets/toyworld_perceptual.safetensors || \
		$(BIN)/python -m finetune.toyworld.classifier --seed 1 --threads 1 --out finetune/assets/toyworld_perceptual.safetensors
	test -f outputs/base/vae/pipeline/model_index.json || $(BIN)/finetune train recipes/pretrain_vae.yaml --resume latest
	test -f outputs/base/unet/pipeline/model_index.json || $(BIN)/finetune train recipes/pretrain_unet.yaml --resume latest
	test -f outputs/base/unet2/pipeline/model_index.json || $(BIN)/finetune train recipes/pretrain_unet_2.yaml --resume latest
	$(BIN)/finetune export-base outputs/base/unet2/pipeline outputs/base/unet2-fp16 --overwrite
	test -f outputs/base/unet3/pipeline/model_index.json || $(BIN)/finetune train recipes/pretrain_unet_3.yaml --resume latest
	$(BIN)/finetune export-base outputs/base/unet3/pipeline finetune/assets/toyworld-base --overwrite

clean:
	rm -rf outputs
