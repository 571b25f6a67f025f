# One entry point for setup, the quickstart and the tests (see README.md).
#   make quickstart   set up .venv and run a real LoRA training on the sample data
#   make test         set up .venv and run the test suite (what CI runs)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
TORCH_VERSION ?= 2.13.0
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup quickstart test test-slow clean

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
	$(BIN)/finetune make-tiny-model outputs/tiny-sd
	$(BIN)/finetune train recipes/quickstart.yaml
	$(BIN)/finetune sample --base outputs/tiny-sd --lora outputs/quickstart --num-images 4 --steps 20 --guidance 5 \
		--prompt "a large red striped circle on a blue background, center" --out outputs/quickstart/sample

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf outputs
