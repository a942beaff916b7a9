# make demo / make test: each creates .venv and installs vlft into it when missing.
PYTHON ?= python3
VENV ?= .venv
# torch + torchvision pair that installs offline on the CPU development machine; on a GPU box
# override it, e.g. `make test TORCH_SPEC="torch torchvision"`, or install vlft into your own env.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.vlft-installed

export HF_HUB_OFFLINE ?= 1
export VLFT_CACHE ?= $(CURDIR)/.cache/vlft
export PIP_CACHE_DIR ?= $(CURDIR)/.cache/pip
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export HF_HOME ?= $(CURDIR)/.cache/huggingface

.PHONY: demo test test-distributed test-all lint install clean

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH_SPEC)
	$(VENV)/bin/pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/finetune_lora.sh

# The suite without the multi-process runs (about 10 minutes on 2 cores); CI (.ci/run) runs both.
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not distributed and not slow" tests

# DDP / ZeRO-2 / ZeRO-3 on 2 CPU processes through the scripts' launcher (tests marked `distributed`), and the
# kill-and-resume runs that take several processes one after another (marked `slow`)
test-distributed: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "distributed or slow" tests

test-all: test test-distributed

lint: $(STAMP)
	$(VENV)/bin/ruff check vlft tests scripts data_examples bench

clean:
	rm -rf $(VENV) .cache output
