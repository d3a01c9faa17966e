"""What ``make gpu-check`` (``bench/gpu_check.py``) runs on: model shapes, sizes, tokenizers, pairs, a one-rank group.

No weights and no tokenizer files reach the GPU node, so everything here is built from configs:

* ``LLAMA_1B``, ``QWEN_15B``: Llama-3.2-1B's and Qwen2.5-1.5B's architectures (their hub ``config.json``), randomly
  initialised by ``mipo.model.loading.load_model`` (``random_init``); the dry run's tiny
  counterparts keep each architecture's kind (Llama, Qwen2 with its q/k/v bias) and grouped heads.
* ``sized_tokenizer``: mipo's byte-level tokenizer (one token per character, mipo's chat
  template) grown to the model's vocabulary with filler tokens that encoding never produces, so
  that the output layer has its real size (V = 128,256 or 151,936) and sampled ids decode.
* ``synthetic_pairs``: GSM8K-shaped pairs of random words: a few-shot block every prompt shares,
  a question of its own, responses of varied lengths; lengths in tokens are lengths in characters.
* ``one_rank_group``: a process group of one rank in this process (gloo on CPU, NCCL for CUDA
  tensors), which FSDP2 needs, without torchrun.
* ``Context``: what the checks share (the device, the sizes, the deadline, models and workloads
  built once), and ``prepared``: the training forward of a layout, as the trainer prepares it.
"""

from __future__ import annotations

import gc
import itertools
import os
import random
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from bench.gpu_report import Report
from bench.mfu import flops_rate, matmul_rate
from mipo.data.chat import TEMPLATE_KWARGS_ATTRIBUTE
from mipo.data.pairs import PairsFile, PreferencePair, write_pairs
from mipo.model.loading import load_model
from mipo.model.tokenizer import BYTE_CHAT_TEMPLATE
from mipo.training.forward import TrainingForward, TrainingRows, encode_training_rows


@dataclass(frozen=True)
class Shape:
    """A model architecture for ``load_model``'s ``random_init`` and its vocabulary size."""

    name: str
    arch: dict[str, Any]
    vocab: int

    def model_cfg(self, seed: int = 0) -> dict[str, Any]:
        """The ``model`` config group of this shape: random weights from ``seed``, sdpa attention."""
        return {"random_init": True, "init_seed": seed, "config": dict(self.arch), "attn_implementation": "sdpa",
                "tokenizer": f"byte-{self.vocab}"}


# meta-llama/Llama-3.2-1B-Instruct's config.json (without its llama3 rope scaling, which changes no cost or path)
LLAMA_1B = Shape("Llama-3.2-1B", dict(model_type="llama", hidden_size=2048, intermediate_size=8192,
                                      num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                      max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                                      tie_word_embeddings=True), 128256)
# Qwen/Qwen2.5-1.5B-Instruct's config.json: q/k/v projections with a bias, 6 query heads per key-value head
QWEN_15B = Shape("Qwen2.5-1.5B", dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960,
                                      num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                      max_position_embeddings=32768,
                                      rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True), 151936)
TINY_LLAMA = Shape("tiny Llama", dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                      tie_word_embeddings=True), 512)
TINY_QWEN = Shape("tiny Qwen2", dict(model_type="qwen2", hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=4096,
                                     tie_word_embeddings=True), 640)


@dataclass(frozen=True)
class Sizes:
    """Every size a check uses: the GPU run's (``GPU``) or the dry run's (``DRY``)."""

    shapes: tuple[Shape, ...]  # step-0 exactness runs on each; the others on the first
    prefix_chars: int  # the few-shot block every prompt shares
    question_chars: tuple[int, int]  # each prompt's own part, min and max
    response_chars: tuple[int, int]  # y+ and y-, min and max
    exact_pairs: int  # pairs of the step-0 and tree-vs-rows checks
    micro_batch: int  # pairs per micro-batch
    warmup_steps: int  # throughput: untimed steps, then timed ones
    timed_steps: int
    matmul_size: int  # the n x n x n product that measures the matrix rate
    kernel_rows: tuple[int, ...]  # log-prob kernels: N
    kernel_vocab: int  # and V
    kernel_hidden: int  # and H for the fused output layer
    sample_prompts: int  # sampling: prompts, of which the one-prompt loop takes the first loop_prompts
    loop_prompts: int
    new_tokens: int
    hf_batch: int  # model.generate's batch


GPU = Sizes(shapes=(LLAMA_1B, QWEN_15B), prefix_chars=384, question_chars=(64, 160), response_chars=(160, 300),
            exact_pairs=8, micro_batch=4, warmup_steps=2, timed_steps=5, matmul_size=8192,
            kernel_rows=(4096, 16384), kernel_vocab=128256, kernel_hidden=2048,
            sample_prompts=64, loop_prompts=8, new_tokens=128, hf_batch=32)
DRY = Sizes(shapes=(TINY_LLAMA, TINY_QWEN), prefix_chars=24, question_chars=(6, 14), response_chars=(5, 16),
            exact_pairs=4, micro_batch=2, warmup_steps=1, timed_steps=2, matmul_size=512,
            kernel_rows=(64,), kernel_vocab=4099, kernel_hidden=32,
            sample_prompts=4, loop_prompts=2, new_tokens=8, hf_batch=2)


# --------------------------------------------------------------------------------------------
# Tokenizer and pairs
# --------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ("<|end|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>")


def sized_tokenizer(vocab: int):
    """mipo's byte-level tokenizer (``mipo.model.tokenizer.byte_tokenizer``) with exactly ``vocab`` tokens.

    The 256 byte characters, then filler tokens (strings of 2 or 3 byte characters, never produced:
    there are no merges, so a text encodes one token per character) up to ``vocab`` less the 5
    special tokens, which come last. Any id decodes, so a random model's samples do too.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    words = itertools.chain(alphabet, ("".join(t) for t in itertools.product(alphabet, repeat=2)),
                            ("".join(t) for t in itertools.product(alphabet, repeat=3)))
    ordinary = itertools.islice(words, vocab - len(SPECIAL_TOKENS))
    core = Tokenizer(models.BPE(vocab={word: i for i, word in enumerate(ordinary)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core)
    tok.add_special_tokens({"eos_token": SPECIAL_TOKENS[0], "pad_token": SPECIAL_TOKENS[1],
                            "additional_special_tokens": list(SPECIAL_TOKENS[2:])})
    tok.chat_template = BYTE_CHAT_TEMPLATE
    tok.padding_side = "left"
    setattr(tok, TEMPLATE_KWARGS_ATTRIBUTE, {})
    if len(tok) != vocab:
        raise AssertionError(f"sized_tokenizer({vocab}) has {len(tok)} tokens")
    return tok


WORDS = ("apple", "river", "stone", "seven", "green", "count", "minus", "plus", "total", "each", "cost", "half",
         "twice", "more", "less", "box", "coins", "train", "miles", "hour", "buys", "sells", "gives", "left")


def words(rng: random.Random, chars: int) -> str:
    """Random words, exactly ``chars`` characters (one token each under ``sized_tokenizer``)."""
    text = ""
    while len(text) < chars:
        text += rng.choice(WORDS) + " "
    return text[:chars]


def synthetic_prompts(sizes: Sizes, n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """``n`` chat prompts: the shared few-shot block (a system message), then a question of their own."""
    rng = random.Random(seed)
    fewshot = words(random.Random(1234), sizes.prefix_chars)
    return [[{"role": "system", "content": fewshot},
             {"role": "user", "content": words(rng, rng.randint(*sizes.question_chars))}] for _ in range(n)]


def synthetic_pairs(sizes: Sizes, n: int, path: Path, seed: int = 0) -> list[PreferencePair]:
    """``n`` pairs on ``synthetic_prompts``, y+ and y- of lengths drawn in ``sizes.response_chars``, written to
    ``path``."""
    rng = random.Random(seed + 1)
    pairs = [PreferencePair(prompt, words(rng, rng.randint(*sizes.response_chars)),
                            words(rng, rng.randint(*sizes.response_chars)), {"uid": f"gpu-check-{i}"})
             for i, prompt in enumerate(synthetic_prompts(sizes, n, seed))]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_pairs(path, pairs)
    return pairs


# --------------------------------------------------------------------------------------------
# A process group of one rank
# --------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def one_rank_group(device: torch.device) -> Iterator[str]:
    """The default process group with this process as its only rank; yields the backend.

    mipo's own ``distributed.init`` starts a group only under torchrun (``WORLD_SIZE`` > 1); FSDP2
    needs one for a single rank too. The backend is mipo's: gloo, and NCCL for CUDA tensors.
    """
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    dist.init_process_group(backend=backend, rank=0, world_size=1)
    try:
        yield backend
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# What the checks share
# --------------------------------------------------------------------------------------------

LOSS = {"beta": 0.1, "label_smoothing": 0.0, "loss_type": "sigmoid"}  # conf/loss/dpo.yaml
MAX_LENGTH, MAX_PROMPT_LENGTH = 2048, 1536
# conf/trainer/default.yaml's optimizer, with a constant learning rate (the schedule costs nothing)
TRAINER = {"lr": 5e-7, "adam_betas": [0.9, 0.95], "weight_decay": 0.0, "lr_scheduler": "constant",
           "warmup_ratio": 0.0, "min_lr_ratio": 0.1, "master_weights": "none"}
SEGMENTS, FLEX, ROWS = "tree · segments", "tree · flex", "rows"
LAYOUTS = {SEGMENTS: {"share_prompt": True, "shared_attention": "segments"},
           FLEX: {"share_prompt": True, "shared_attention": "flex"},
           ROWS: {"share_prompt": False, "shared_attention": "auto"}}


@dataclass(frozen=True)
class Workload:
    pairs: list
    file: PairsFile
    rows: TrainingRows
    pad: int  # the tokenizer's pad id


@dataclass
class Context:
    """What the checks share: the device, the sizes, the deadline, and models loaded once."""

    device: torch.device
    sizes: Sizes
    deadline: float  # time.monotonic() at which the budget is spent
    workdir: Path  # pairs files and the reference cache
    report: Report
    models: dict[str, Any] = field(default_factory=dict)
    tokenizers: dict[int, Any] = field(default_factory=dict)
    workloads: dict[tuple[str, str], Workload] = field(default_factory=dict)
    rate: float | None = None

    @property
    def dry(self) -> bool:
        return self.device.type != "cuda"

    @property
    def autocast(self) -> torch.dtype:
        """The trainer's autocast on a GPU (``trainer.autocast=auto`` with fp32 weights); the dry run keeps it."""
        return torch.bfloat16

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def layouts(self) -> tuple[str, ...]:
        """The training forward's layouts to check: flex attention on a GPU only (on CPU PyTorch has no flex
        backward, and compiles its forward to C++ in 10-20 s: tests/training/test_forward.py checks that forward)."""
        return (SEGMENTS, ROWS) if self.dry else (SEGMENTS, FLEX, ROWS)

    def tokenizer(self, shape: Shape):
        if shape.vocab not in self.tokenizers:
            self.tokenizers[shape.vocab] = sized_tokenizer(shape.vocab)
        return self.tokenizers[shape.vocab]

    def policy(self, shape: Shape) -> torch.nn.Module:
        """The shape's model as the trainer loads the policy (fp32 weights), loaded once."""
        if shape.name not in self.models:
            self.models[shape.name] = load_model(shape.model_cfg(), device=self.device, dtype=torch.float32,
                                                 vocab_size=shape.vocab)
        return self.models[shape.name]

    def drop(self, shape: Shape) -> None:
        self.models.pop(shape.name, None)
        release(self.device)

    def workload(self, shape: Shape, name: str, n: int, seed: int = 0) -> Workload:
        """``n`` synthetic pairs (``synthetic_pairs``) and their rows under the shape's tokenizer."""
        if (shape.name, name) not in self.workloads:
            path = self.workdir / f"{name}-{n}-{seed}.jsonl"
            pairs = synthetic_pairs(self.sizes, n, path, seed)
            rows = encode_training_rows(self.tokenizer(shape), pairs, "sigmoid", MAX_LENGTH, MAX_PROMPT_LENGTH)
            self.workloads[(shape.name, name)] = Workload(pairs, PairsFile.hashed(path), rows,
                                                          self.tokenizer(shape).pad_token_id)
        return self.workloads[(shape.name, name)]

    def matrix_rate(self) -> float:
        """FLOP/s of a large matrix product in the dtype the work computes in (bf16 on a GPU), measured once."""
        if self.rate is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            size = self.sizes.matmul_size
            self.rate = matmul_rate(self.device, dtype, size)
            self.report.measured[f"{str(dtype).removeprefix('torch.')} matrix rate ({size}^3 product)"] = \
                flops_rate(self.rate)
        return self.rate


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def prepared(policy: torch.nn.Module, layout: str, fused: bool, autocast: torch.dtype | None) -> TrainingForward:
    """``TrainingForward.prepare`` as the trainer calls it, for ``layout`` (``LAYOUTS``) and output layer."""
    policy.set_attn_implementation("sdpa")  # the loaded model's: the plain rows keep it, the tree switches it
    cfg = {"trainer": LAYOUTS[layout], "kernel": "auto", "fused_lm_head": fused}
    return TrainingForward.prepare(cfg, policy, autocast)


def micro_batches(n: int, size: int) -> list[list[int]]:
    return [list(range(start, min(start + size, n))) for start in range(0, n, size)]

