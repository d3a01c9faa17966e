"""Model FLOP utilisation: the fraction of the machine's measured matrix rate a piece of work reaches.

    utilisation = model FLOPs / seconds / matrix rate

* **Model FLOPs** (``model_flops``): ``6 * params * tokens`` for a training step (forward and
  backward), ``2 * params * tokens`` for a forward (the reference pass, sampling), as in the PaLM
  paper's MFU. ``params`` (``matmul_params``) are the parameters that take part in a matrix
  product: every parameter once (a tied output layer counts once), less an input embedding the
  output layer does not share (a lookup, no FLOPs). Attention's own products (quadratic in the
  length) are not counted, so the figure is a slight underestimate for long rows.
* **tokens** are the tokens of the work, each (prompt, response) row counted in full and
  without padding: a DPO pair is two rows, (x, y+) and (x, y-). The same count is used for every
  implementation of the same work, so that their utilisations compare as their speeds do; one
  that runs each prompt once (mipo's prompt tree) does less arithmetic for the same model FLOPs.
* **Matrix rate** (``matmul_rate``): FLOP/s of one large ``n x n x n`` product (``2 n^3`` FLOPs) in
  the dtype the work computes in (bf16 on a GPU, fp32 on a CPU), measured in the same run on the
  same device, mean of ``repeats`` products after warm-ups. It stands for the peak the hardware
  reaches in practice, not the data sheet's.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def seconds(step: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of ``step()`` (CUDA: the device's work included)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 10) -> float:
    """FLOP/s of an ``size x size x size`` matrix product of random ``dtype`` matrices on ``device``."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    return 2 * size**3 / statistics.mean(seconds(lambda: a @ b, device) for _ in range(repeats))


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """Bytes/s of a ``nbytes`` tensor copy on ``device``, counting bytes read and written (median of ``repeats``)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    return 2 * nbytes / statistics.median(seconds(lambda: dst.copy_(src), device) for _ in range(repeats))


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters that take part in a matrix product: all, each once, less an untied input embedding."""
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    embedding, output = model.get_input_embeddings(), model.get_output_embeddings()
    tied = output is not None and output.weight is embedding.weight
    return total if tied else total - embedding.weight.numel()


def model_flops(params: int, tokens: int, backward: bool) -> float:
    """``6 * params * tokens`` with the backward (a training step), ``2 * params * tokens`` without (a forward)."""
    return (6 if backward else 2) * params * tokens


def utilisation(flops: float, seconds: float, rate: float) -> float:
    """The fraction of ``rate`` (FLOP/s) that ``flops`` done in ``seconds`` reach."""
    return flops / seconds / rate


def pair_tokens(rows: list, index: list[int] | range) -> int:
    """Tokens of DPO's two rows, (x, y+) and (x, y-), of the pairs ``index``; ``rows``: (chosen rows, rejected rows)."""
    chosen, rejected = rows
    return sum(len(chosen[i].input_ids) + len(rejected[i].input_ids) for i in index)


def percent(fraction: float) -> str:
    return f"{100 * fraction:.1f}%"


def flops_rate(rate: float) -> str:
    """FLOP/s in the unit that suits it."""
    return f"{rate / 1e12:.1f} TFLOP/s" if rate >= 1e12 else f"{rate / 1e9:.1f} GFLOP/s"
