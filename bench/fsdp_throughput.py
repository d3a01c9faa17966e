"""Training throughput with FSDP2: tokens/s and peak memory of a randomly initialised Llama-3.2-1B-sized policy.

    torchrun --standalone --nproc_per_node=<GPUs> -m bench.fsdp_throughput            # writes bench/FSDP_RESULTS.md
    torchrun --standalone --nproc_per_node=2 -m bench.fsdp_throughput --tiny --steps 2 # CPU smoke run (gloo)

The trainer's own pieces, nothing else: ``TrainingForward`` (prompt-shared forward, DPO loss)
wrapped by ``mipo.training.parallel.wrap(strategy="fsdp")`` (FSDP2 per decoder layer, bf16 mixed
precision with fp32 master weights and fp32 gradient reduction on a GPU), AdamW, gradient
clipping. Synthetic pairs of random tokens: ``--prompt-tokens`` per prompt and
``--response-tokens`` per response, ``--micro-batch`` pairs per micro-batch and rank, one
micro-batch per step. Run twice, with the log-prob kernel on (``kernel=triton``: the Triton
``linear_logprob``) and off (``kernel=torch``: the chunked PyTorch implementation).

tokens/s counts the tokens a step trains on over all ranks (each prompt once, each response
once: what the prompt-shared forward runs), median over the timed steps; peak memory is
``torch.cuda.max_memory_allocated`` on rank 0. The results file names the GPU. Nothing is
written without a GPU unless ``--out`` is given (the CPU run is a smoke test, not a result).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from mipo.data.encoding import EncodedRow
from mipo.model.loading import enable_activation_checkpointing, load_model
from mipo.runtime import distributed
from mipo.training import parallel
from mipo.training.forward import ReferenceLogps, TrainingForward, TrainingRows

# Llama-3.2-1B's shape (meta-llama/Llama-3.2-1B-Instruct config.json), randomly initialised
LLAMA_1B = dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0,
                tie_word_embeddings=True)
TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096)
VOCAB = 128256


def synthetic_rows(n: int, prompt_tokens: int, response_tokens: int, vocab: int,
                   seed: int) -> tuple[list[EncodedRow], list[EncodedRow]]:
    g = torch.Generator().manual_seed(seed)

    def ids(k: int) -> tuple[int, ...]:
        return tuple(torch.randint(3, vocab, (k,), generator=g).tolist())

    prompts = [ids(prompt_tokens) for _ in range(n)]
    return ([EncodedRow(p, ids(response_tokens)) for p in prompts], [EncodedRow(p, ids(response_tokens)) for p in prompts])


def run(kernel: str, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    arch = TINY if args.tiny else LLAMA_1B
    vocab = 256 if args.tiny else VOCAB
    model_cfg = {"random_init": True, "init_seed": 0, "config": arch, "attn_implementation": "sdpa"}
    policy = load_model(model_cfg, device=device, dtype=torch.float32, vocab_size=vocab)
    if args.gradient_checkpointing:
        enable_activation_checkpointing(policy, {"use_reentrant": False})
    policy.train()
    autocast = torch.bfloat16 if device.type == "cuda" else None
    cfg = {"trainer": {"share_prompt": True, "shared_attention": "auto"}, "kernel": kernel, "fused_lm_head": True}
    forward = parallel.wrap(policy, TrainingForward.prepare(cfg, policy, autocast), "fsdp", device,
                            mixed_precision=autocast, cpu_offload=args.cpu_offload)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=5e-7, betas=(0.9, 0.95), weight_decay=0.0)
    b = args.micro_batch
    chosen, rejected = synthetic_rows(b * (args.steps + args.warmup), args.prompt_tokens, args.response_tokens, vocab,
                                      seed=distributed.rank())
    rows = TrainingRows(chosen, rejected)
    reference = ReferenceLogps(torch.zeros(len(chosen)), torch.zeros(len(chosen)), Path("-"), cache_hit=True)
    loss_cfg = {"beta": 0.1, "label_smoothing": 0.0, "loss_type": "sigmoid"}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(args.warmup + args.steps):
        index = list(range(step * b, (step + 1) * b))
        batch = forward.collate_rows(rows, index, reference, 0, loss_cfg["loss_type"]).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        forward.sync_gradients(last=True)
        loss, _ = forward(policy, batch, loss_cfg)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        distributed.barrier()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    tokens = b * (args.prompt_tokens + 2 * args.response_tokens) * distributed.world_size()
    seconds = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"tokens_per_s": tokens / seconds, "step_s": seconds, "peak_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny model (CPU smoke run)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--micro-batch", type=int, default=4, help="pairs per rank and step")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--response-tokens", type=int, default=256)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--cpu-offload", action="store_true")
    parser.add_argument("--kernels", default="triton,torch", help="log-prob kernels to compare (on: triton, off: torch)")
    parser.add_argument("--out", type=Path, default=None, help="results file (default on a GPU: bench/FSDP_RESULTS.md)")
    args = parser.parse_args()
    if not distributed.init():
        raise SystemExit("run under torchrun, e.g. torchrun --standalone --nproc_per_node=1 -m bench.fsdp_throughput")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    rows = {kernel: run(kernel, args, device) for kernel in args.kernels.split(",")}
    out = args.out or (Path(__file__).with_name("FSDP_RESULTS.md") if device.type == "cuda" else None)
    if distributed.is_main():
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke run, not a result)"
        lines = [f"# FSDP2 training throughput: {'tiny Llama' if args.tiny else 'Llama-3.2-1B-sized, random init'}",
                 "", f"{distributed.world_size()} x {gpu}; torch {torch.__version__}; "
                 f"{args.micro_batch} pairs/rank/step, prompt {args.prompt_tokens} + 2 x {args.response_tokens} "
                 f"response tokens; gradient checkpointing {args.gradient_checkpointing}; cpu offload {args.cpu_offload}; "
                 f"median of {args.steps} steps after {args.warmup}", "",
                 "| log-prob kernel | tokens/s (all ranks) | s/step | peak memory, rank 0 (GiB) |", "|---|---|---|---|"]
        lines += [f"| {k} | {r['tokens_per_s']:.0f} | {r['step_s']:.3f} | {r['peak_gib']:.2f} |" for k, r in rows.items()]
        print("\n".join(lines))
        if out is not None:
            out.write_text("\n".join(lines) + "\n")
    distributed.close()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
