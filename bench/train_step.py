"""mipo's training step and reference pass against TRL's DPOTrainer, interleaved, on one workload.

Each framework runs in its own worker process (so that each has its own peak RSS), both alive
for the whole comparison; the driver hands out work one item at a time and alternates who goes
first, so machine noise hits both alike and only one of them computes at any moment:

    reference pass   mipo: ``Scorer.score_rows`` over all (x, y+) and (x, y-) rows, as
                     ``mipo.stages.reference`` runs it, once before and once after TRL's (the mean is
                     reported, both are printed); TRL: ``DPOTrainer._precompute_ref_logps``
                     (``precompute_ref_log_probs=True``), timed around that call alone
    training steps   mipo: collate, ``TrainingForward`` (forward + loss), backward, clip, AdamW
                     step, as ``mipo.training.step.optimizer_step`` runs them; TRL: ``trainer.train()``, each step
                     timed from ``on_step_begin`` to ``on_step_end`` by a callback that also
                     waits for the driver before letting the next step start

Both see the same pairs in the same order (TRL with ``train_sampling_strategy="sequential"``,
mipo taking them in file order), the same model object type and weights (fp32, sdpa), the same
lr and beta, no warmup. TRL's batch collation happens before ``on_step_begin`` and is not
counted in its time; mipo's is counted in its own.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Settings:
    workload: str
    overrides: tuple[str, ...] = ()
    steps: int = 12
    skip: int = 2  # steps left out of the median (warm-up)
    pairs_per_step: int = 2
    lr: float = 5e-7
    beta: float = 0.1
    gradient_checkpointing: bool = False
    reference_batch_pairs: int = 4  # pairs per reference batch, for both
    threads: int = 0  # torch threads per worker; 0: all cores


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def alternate_steps(pipes: dict[str, Any], order: list[str], steps: int) -> dict[str, list[float]]:
    """``steps`` rounds of one ``"step"`` per worker, the order reversed every other round so that a change of
    load hits every worker alike; each worker answers with its step's seconds."""
    times: dict[str, list[float]] = {name: [] for name in order}
    for step in range(steps):
        for name in order if step % 2 == 0 else order[::-1]:
            pipes[name].send("step")
            times[name].append(pipes[name].recv())
    return times


def _setup(settings: Settings):
    if settings.threads:
        torch.set_num_threads(settings.threads)
    from bench.workloads import pairs_file, workload_config
    from mipo.data.pairs import read_pairs
    from mipo.model.loading import load_model, run_tokenizer

    cfg = workload_config(settings.workload, *settings.overrides, f"loss.beta={settings.beta}",
                          f"trainer.lr={settings.lr}", "trainer.warmup_ratio=0",
                          f"trainer.batch_size={settings.pairs_per_step}",
                          f"trainer.micro_batch_size={settings.pairs_per_step}",
                          f"trainer.gradient_checkpointing={settings.gradient_checkpointing}")
    pairs = read_pairs(pairs_file(settings.workload, cfg))
    tokenizer = run_tokenizer(cfg)

    def model():
        return load_model(cfg.model, device="cpu", dtype=torch.float32, cache_dir=cfg.paths.cache_dir,
                          vocab_size=len(tokenizer))

    return cfg, pairs, tokenizer, model


# --------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------

def mipo_worker(conn, settings: Settings) -> None:
    from mipo.data.encoding import encode_pairs
    from mipo.model.loading import enable_activation_checkpointing
    from mipo.model.logprobs import Scorer, ScoringSettings
    from mipo.training.forward import ReferenceLogps, TrainingForward, TrainingRows
    from mipo.training.optim import build_optimizer

    cfg, pairs, tokenizer, load = _setup(settings)
    chosen, rejected = encode_pairs(tokenizer, pairs, cfg.data.max_length, cfg.data.max_prompt_length)
    reference_model = load().requires_grad_(False)
    scorer = Scorer(reference_model, tokenizer, ScoringSettings(cfg.data.max_length, cfg.data.max_prompt_length,
                                                                batch_size=2 * settings.reference_batch_pairs,
                                                                kernel=cfg.kernel))
    while conn.recv() == "reference":  # the driver asks twice, before and after TRL's pass
        start = time.perf_counter()
        logps = scorer.score_rows(chosen + rejected, desc=None)
        conn.send(time.perf_counter() - start)
    del reference_model, scorer
    reference = ReferenceLogps(logps[: len(pairs)], logps[len(pairs):], path=None, cache_hit=False)
    rows = TrainingRows(chosen, rejected)

    policy = load()
    if settings.gradient_checkpointing:
        enable_activation_checkpointing(policy)
    policy.train()
    forward = TrainingForward.prepare(cfg, policy)
    optimizer = build_optimizer(policy, cfg.trainer)
    step = 0
    while conn.recv() == "step":
        index = list(range(step * settings.pairs_per_step, (step + 1) * settings.pairs_per_step))
        start = time.perf_counter()
        batch = forward.collate_rows(rows, index, reference, tokenizer.pad_token_id, cfg.loss.loss_type)
        loss, _ = forward(policy, batch, cfg.loss)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.trainer.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        conn.send(time.perf_counter() - start)
        step += 1
    conn.send(peak_rss_gib())


def trl_worker(conn, settings: Settings) -> None:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    cfg, pairs, tokenizer, load = _setup(settings)
    tokenizer.padding_side = "right"
    dataset = Dataset.from_list([{"prompt": p.prompt, "chosen": [{"role": "assistant", "content": p.chosen}],
                                  "rejected": [{"role": "assistant", "content": p.rejected}]} for p in pairs])
    reference_time: list[float] = []
    precompute = DPOTrainer._precompute_ref_logps

    def timed_precompute(self, *args, **kwargs):
        start = time.perf_counter()
        out = precompute(self, *args, **kwargs)
        reference_time.append(time.perf_counter() - start)
        return out

    DPOTrainer._precompute_ref_logps = timed_precompute

    class Stepper(TrainerCallback):
        """Times each step and holds the next one until the driver asks for it."""

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            conn.send(time.perf_counter() - self.start)
            if conn.recv() != "step":
                control.should_training_stop = True

    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(
            output_dir=out, per_device_train_batch_size=settings.pairs_per_step, gradient_accumulation_steps=1,
            learning_rate=settings.lr, beta=settings.beta, lr_scheduler_type="constant", warmup_steps=0,
            max_steps=settings.steps + 1, max_grad_norm=cfg.trainer.max_grad_norm, weight_decay=0.0,
            max_length=cfg.data.max_length, precompute_ref_log_probs=True,
            precompute_ref_batch_size=settings.reference_batch_pairs,
            gradient_checkpointing=settings.gradient_checkpointing, train_sampling_strategy="sequential",
            use_cpu=True, bf16=False, fp16=False, report_to=[], save_strategy="no", logging_steps=10**6,
            disable_tqdm=True, dataloader_num_workers=0, seed=cfg.seed)
        assert conn.recv() == "reference"
        trainer = DPOTrainer(model=load(), args=args, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[Stepper()])
        conn.send(reference_time[0])
        assert conn.recv() == "step"
        trainer.train()
    conn.send(peak_rss_gib())


WORKERS = {"mipo": mipo_worker, "trl": trl_worker}


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------

def compare(settings: Settings) -> dict[str, Any]:
    """Run both workers on ``settings.workload``, interleaved; returns times, medians and peaks."""
    context = mp.get_context("spawn")
    pipes, processes = {}, {}
    for name, target in WORKERS.items():
        parent, child = context.Pipe()
        processes[name] = context.Process(target=target, args=(child, settings), name=f"bench-{name}")
        processes[name].start()
        pipes[name] = parent
    order = list(WORKERS)
    try:
        # one long pass each, mipo before and after TRL's so that a change of load shows (mipo: the mean)
        passes: dict[str, list[float]] = {name: [] for name in order}
        for name in ("mipo", "trl", "mipo"):
            pipes[name].send("reference")
            passes[name].append(pipes[name].recv())
        pipes["mipo"].send("train")
        reference = {name: statistics.mean(times) for name, times in passes.items()}
        steps = alternate_steps(pipes, order, settings.steps)
        peak = {}
        for name in order:
            pipes[name].send("done")
            peak[name] = pipes[name].recv()
    finally:
        for process in processes.values():
            process.join(timeout=60)
            if process.is_alive():
                process.terminate()
    median = {name: statistics.median(times[min(settings.skip, len(times) - 1):]) for name, times in steps.items()}
    return {"settings": asdict(settings), "reference_s": reference, "reference_passes_s": passes, "step_s": steps, "median_step_s": median,
            "peak_rss_gib": peak}
