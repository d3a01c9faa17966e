"""``make gpu-check``'s figures (``bench/gpu_check.py``, checks 4 to 6): training throughput, the log-prob
kernels, sampling, each against the machine's own rates measured in the same run (``bench/mfu.py``)."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import torch

from bench import gpu_setup
from bench.gpu_report import Result, one_line, version
from bench.gpu_setup import FLEX, LOSS, ROWS, SEGMENTS, TRAINER, Context, micro_batches, prepared, release
from bench.mfu import copy_bandwidth, flops_rate, matmul_params, model_flops, pair_tokens, percent, seconds
from mipo.training import parallel
from mipo.training.forward import ReferenceLogps, TrainingForward, TrainingRows
from mipo.training.optim import build_optimizer, build_scheduler
from mipo.training.step import LoopState, StepData, StepModel, StepSettings, optimizer_step

# --------------------------------------------------------------------------------------------
# 4. Training throughput of the 1B model
# --------------------------------------------------------------------------------------------

def uniform_reference(rows: TrainingRows, vocab: int) -> ReferenceLogps:
    """log pi_ref of a uniform model (-len(y) log V): near a random model's own, so the losses stay finite and small."""
    def logps(column: list) -> torch.Tensor:
        return torch.tensor([-len(row.response_ids) * math.log(vocab) for row in column])
    return ReferenceLogps(logps(rows.chosen), logps(rows.rejected), Path("-"), cache_hit=True)


def timed_steps(ctx: Context, policy: torch.nn.Module, data: StepData, layout: str,
                fused: bool) -> tuple[list[float], float]:
    """``optimizer_step`` (collate, forward, backward, clipping, AdamW) as the trainer runs it, one micro-batch a
    step: the timed steps' seconds, after the warm-up ones, and the peak memory allocated (GiB; CUDA only)."""
    sizes = ctx.sizes
    total = sizes.warmup_steps + sizes.timed_steps
    forward = parallel.wrap(policy, prepared(policy, layout, fused, ctx.autocast), "single", ctx.device)
    optimizer = build_optimizer(policy, TRAINER)
    model = StepModel(policy, forward, optimizer, build_scheduler(optimizer, TRAINER, total))
    settings = StepSettings(LOSS, sizes.micro_batch, 1, 1.0, False, 1, 0)
    state = LoopState(micro_batches(sizes.micro_batch * total, sizes.micro_batch), [], [])
    times = []
    for step in range(1, total + 1):
        if step == sizes.warmup_steps + 1 and ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        times.append(seconds(partial(optimizer_step, step, model, data, settings, state), ctx.device))
    peak = torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.device.type == "cuda" else float("nan")
    return times[sizes.warmup_steps:], peak


def check_training_throughput(ctx: Context, r: Result) -> None:
    shape, sizes = ctx.sizes.shapes[0], ctx.sizes
    policy = ctx.policy(shape)
    total = sizes.warmup_steps + sizes.timed_steps
    work = ctx.workload(shape, "throughput", sizes.micro_batch * total, seed=3)
    data = StepData(work.pairs, work.file.path, work.rows, uniform_reference(work.rows, shape.vocab), work.pad,
                    ctx.device)
    rate, params = ctx.matrix_rate(), matmul_params(policy)
    timed = micro_batches(sizes.micro_batch * total, sizes.micro_batch)[sizes.warmup_steps:]
    row_tokens = [pair_tokens((work.rows.chosen, work.rows.rejected), index) for index in timed]
    tree = TrainingForward(share_prompt=True)
    tree_tokens = [tree.collate_rows(work.rows, index, data.reference, work.pad, "sigmoid").inputs.input_ids.shape[1]
                   for index in timed]
    r.note = (f"{shape.name}, fp32 weights, bf16 autocast, AdamW; {sizes.micro_batch} pairs a step, median of "
              f"{sizes.timed_steps} steps after {sizes.warmup_steps}; tokens: each (x, y) row in full "
              f"({sum(row_tokens) / len(timed):.0f} a step; the tree runs {sum(tree_tokens) / len(timed):.0f}); "
              "MFU: 6 × params × tokens / time / the matrix rate")
    r.figures["parameters in matrix products"] = f"{params / 1e6:.1f} M"
    r.figures["matrix rate measured in this run"] = flops_rate(rate)
    r.tables = ["| layout | output layer | s/step (median) | tokens/s | peak GiB | MFU |", "|---|---|---|---|---|---|"]
    configs = [(SEGMENTS, True), (SEGMENTS, False), (ROWS, True), (ROWS, False)]
    configs += [(FLEX, True)] if FLEX in ctx.layouts() else []
    flops = sum(model_flops(params, tokens, backward=True) for tokens in row_tokens)
    passed = True
    for layout, fused in configs:
        output_layer = "fused (linear_logprob)" if fused else "logits + gather"
        measured = r.attempt(f"{layout}, {output_layer}", partial(timed_steps, ctx, policy, data, layout, fused))
        release(ctx.device)  # the optimizer's states
        if measured is None:
            passed = False
            continue
        times, peak = measured
        r.tables.append(f"| {layout} | {output_layer} | {sorted(times)[len(times) // 2]:.3f} | "
                        f"{sum(row_tokens) / sum(times):.0f} | {peak:.1f} | {percent(flops / sum(times) / rate)} |")
    r.passed = passed


# --------------------------------------------------------------------------------------------
# 5. The log-prob kernels at the output layer's size
# --------------------------------------------------------------------------------------------

def check_kernel_bench(ctx: Context, r: Result) -> None:
    from mipo.kernels import bench_logprob as kb

    sizes, cuda = ctx.sizes, ctx.device.type == "cuda"
    dtype = "bf16" if cuda else "fp32"
    setup = kb.Setup(ctx.device, repeats=10 if cuda else 3, warmup=2 if cuda else 1, chunk_size=1024,
                     linear_chunk_size=1024)
    setup.copy_bandwidth = kb.measure_copy_bandwidth(ctx.device) if cuda else copy_bandwidth(ctx.device, 2**26)
    ctx.report.measured["copy bandwidth (read + write)"] = f"{setup.copy_bandwidth / 1e9:.0f} GB/s"
    for n in sizes.kernel_rows:
        setup.results += kb.bench_gather(setup, dtype, n, sizes.kernel_vocab)
        setup.results += kb.bench_linear(setup, dtype, n, sizes.kernel_vocab, sizes.kernel_hidden)
    kb.add_ratios(setup.results)
    r.note = (f"{dtype}, V = {sizes.kernel_vocab}, H = {sizes.kernel_hidden}; forward + backward, median of "
              f"{setup.repeats}; % of copy BW: the bytes a fused gather must move / time / the copy bandwidth")
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss  # noqa: F401

        r.figures["Liger cross-entropy"] = f"liger-kernel {version('liger-kernel')}{'' if cuda else ' (a GPU column)'}"
    except Exception as error:  # not carried, or not importable with these releases: the column is left out
        r.figures["Liger cross-entropy"] = f"not importable: {one_line(error, 160)}"
    r.tables = kb.markdown_table(setup.results, show_bandwidth=True).splitlines()
    failed = [f"{x.method} N={x.n}: {x.note}" for x in setup.results if x.time_ms is None and x.method != "liger-ce"]
    ran = {x.method for x in setup.results if x.time_ms is not None}
    if failed:
        r.figures["methods that did not run"] = "; ".join(failed)
    r.passed = not failed and (not cuda or "triton" in ran)


# --------------------------------------------------------------------------------------------
# 6. Sampling: mipo's decode loop against model.generate
# --------------------------------------------------------------------------------------------

TEMPERATURE, TOP_P = 0.1, 0.9  # the paper's sampling (conf/config.yaml)


def hf_generate(model: torch.nn.Module, tokenizer, prompt_ids: list[list[int]], batch_size: int,
                new_tokens: int) -> int:
    """``model.generate`` on left-padded, length-sorted batches on the model's device (``bench.sampling.hf_generate``,
    whose batches stay on the CPU); returns the useful tokens (each row's before its end-of-turn token)."""
    from bench.sampling import useful_tokens
    from mipo.data.encoding import left_pad

    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]), reverse=True)
    total = 0
    for start in range(0, len(order), batch_size):
        input_ids, attention_mask = left_pad([prompt_ids[i] for i in order[start:start + batch_size]],
                                             tokenizer.pad_token_id)
        output = model.generate(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                                max_new_tokens=new_tokens, do_sample=True, temperature=TEMPERATURE, top_p=TOP_P,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        total += sum(useful_tokens(row[input_ids.shape[1]:], tokenizer.eos_token_id) for row in output)
    return total


def check_sampling(ctx: Context, r: Result) -> None:
    from mipo.data.encoding import encode_prompt
    from mipo.model.generation import DecodeSettings, PlanSettings, generate

    shape, sizes = ctx.sizes.shapes[0], ctx.sizes
    model, tokenizer = ctx.policy(shape), ctx.tokenizer(shape)
    model.set_attn_implementation("sdpa")
    model.to(torch.bfloat16 if ctx.device.type == "cuda" else torch.float32).eval()  # model.dtype=auto, as sampling
    prompts = gpu_setup.synthetic_prompts(sizes, sizes.sample_prompts, seed=7)
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    settings = DecodeSettings(sizes.new_tokens, temperature=TEMPERATURE, top_p=TOP_P)
    loop = sizes.loop_prompts
    methods = {
        "mipo.model.generation (batch auto)": (len(prompts), lambda: generate(
            model, tokenizer, prompts, settings, PlanSettings(batch_size="auto"), desc=None).summary()["new_tokens"]),
        f"model.generate, batches of {sizes.hf_batch}": (len(prompts), lambda: hf_generate(
            model, tokenizer, prompt_ids, sizes.hf_batch, sizes.new_tokens)),
        f"one-prompt loop (first {loop} prompts)": (loop, lambda: hf_generate(
            model, tokenizer, prompt_ids[:loop], 1, sizes.new_tokens)),
    }
    rate, params = ctx.matrix_rate(), matmul_params(model)
    with torch.no_grad():
        generate(model, tokenizer, prompts[:2], DecodeSettings(4, temperature=TEMPERATURE, top_p=TOP_P), desc=None)
        hf_generate(model, tokenizer, prompt_ids[:2], 2, 4)  # warm-ups
        r.tables = ["| method | seconds | new tokens | new tokens/s | x one-prompt loop | MFU |",
                    "|---|---|---|---|---|---|"]
        results = {}
        for name, (n, method) in methods.items():
            new_tokens: list[int] = []
            elapsed = seconds(lambda: new_tokens.append(method()), ctx.device)  # noqa: B023 (called at once)
            results[name] = (n, new_tokens[0], elapsed)
    base = results[f"one-prompt loop (first {loop} prompts)"]
    for name, (n, new_tokens, elapsed) in results.items():
        flops = model_flops(params, sum(len(ids) for ids in prompt_ids[:n]) + new_tokens, backward=False)
        r.tables.append(f"| {name} | {elapsed:.2f} | {new_tokens} | {new_tokens / elapsed:.0f} | "
                        f"{new_tokens / elapsed / (base[1] / base[2]):.2f} | {percent(flops / elapsed / rate)} |")
    r.note = (f"{shape.name} in {str(model.dtype).removeprefix('torch.')}, {len(prompts)} prompts of "
              f"{sum(map(len, prompt_ids)) / len(prompts):.0f} tokens (a shared block of {sizes.prefix_chars}), "
              f"{sizes.new_tokens} new tokens, temperature {TEMPERATURE}, top_p {TOP_P}; "
              "MFU: 2 × params × (prompt + new tokens)")
    r.passed = all(new_tokens > 0 for _, new_tokens, _ in results.values())
    ctx.drop(shape)
