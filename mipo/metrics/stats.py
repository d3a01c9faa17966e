"""Paired comparisons of two models scored on the same prompts.

Base and trained model answer the same evaluation prompts, and their pmi is measured with the
same alternative prompts, so the per-prompt differences d_i = trained_i - base_i are the unit of
comparison: their mean, its standard error, a bootstrap confidence interval over prompts and a
p-value (McNemar's exact test for 0/1 outcomes such as correctness, a sign-flip permutation
test for real-valued ones such as pmi). Each function holds one formula, cited in its docstring.

    comparison = paired_comparison(trained_correct, base_correct, binary=True, resamples=10_000, seed=0)
    comparison.record()   # {"mean", "stderr", "ci95": [lo, hi], "p_value", "n", "test"}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

# Above this many prompts the sign-flip test samples random signs instead of enumerating all 2^n.
EXACT_SIGN_FLIP_MAX_N = 12


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean, std (ddof=1) / sqrt(n); NaN stderr for n = 1.

    For 0/1 values this is the usual sqrt(p (1 - p) / (n - 1)) (the ddof=1 form; the Wald
    sqrt(p (1 - p) / n) differs by a factor sqrt(n / (n - 1))).
    """
    x = np.asarray(values, dtype=np.float64)  # (n,)
    if x.size == 0:
        raise ValueError("mean_stderr needs at least one value")
    stderr = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else float("nan")
    return float(x.mean()), stderr


def paired_differences(treated: Sequence[float], control: Sequence[float]) -> np.ndarray:
    """d_i = treated_i - control_i over the same prompts; (n,) float64.

    Raises:
        ValueError: the two lists have different lengths (they must be the same prompts, in order).
    """
    a, b = np.asarray(treated, dtype=np.float64), np.asarray(control, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values must be two 1-D lists over the same prompts, got shapes {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError("no paired values: the evaluation has no prompts")
    return a - b


def paired_stderr(differences: Sequence[float]) -> float:
    """Standard error of the mean paired difference, std(d, ddof=1) / sqrt(n) (NaN for n = 1).

    Smaller than sqrt(se_a^2 + se_b^2) whenever the two models' per-prompt values are positively
    correlated, which they are on the same prompts.
    """
    return mean_stderr(differences)[1]


def bootstrap_ci(differences: Sequence[float], resamples: int = 10_000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean difference, resampling prompts.

    Efron & Tibshirani (1993), *An Introduction to the Bootstrap*, Sec. 13.3: draw ``resamples``
    samples of n prompts with replacement (one ``numpy.random.default_rng(seed)``), take each
    sample's mean, and return the (1 - level)/2 and (1 + level)/2 quantiles of those means.
    Vectorised in blocks of resamples, so 10,000 resamples of 1,000 prompts take milliseconds.

    Args:
        differences: (n,) per-prompt differences d_i.
        resamples: bootstrap samples, >= 1.
        seed: seeds the generator; the same inputs and seed give the same interval.
        level: coverage, in (0, 1).
    """
    d = np.asarray(differences, dtype=np.float64)  # (n,)
    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"bootstrap needs resamples >= 1 and 0 < level < 1, got {resamples} and {level}")
    rng = np.random.default_rng(seed)
    n = d.size
    means = np.empty(resamples)  # (R,)
    block = max(1, 4_000_000 // max(n, 1))  # resamples per block: at most ~4M indices in memory
    for start in range(0, resamples, block):
        count = min(block, resamples - start)
        index = rng.integers(0, n, size=(count, n))  # (count, n)
        means[start : start + count] = d[index].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def mcnemar_exact(treated: Sequence[bool], control: Sequence[bool]) -> float:
    """Two-sided exact McNemar p-value for paired 0/1 outcomes (e.g. correct on the same prompt).

    McNemar (1947), *Psychometrika* 12(2); exact form: under H0 the discordant pairs split
    evenly, so with b = #(treated right, control wrong) and c = #(treated wrong, control right),
    b ~ Binomial(b + c, 1/2) and

        p = min(1, 2 * sum_{i=0}^{min(b, c)} C(b + c, i) / 2^(b + c)),

    and p = 1 when there are no discordant pairs.
    """
    a, b_ = np.asarray(treated, dtype=bool), np.asarray(control, dtype=bool)
    if a.shape != b_.shape:
        raise ValueError(f"paired outcomes over the same prompts must have the same length, got {a.size} and {b_.size}")
    b = int(np.sum(a & ~b_))
    c = int(np.sum(~a & b_))
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def sign_flip_p_value(differences: Sequence[float], resamples: int = 10_000, seed: int = 0) -> float:
    """Two-sided paired permutation (sign-flip) test of mean difference 0.

    Fisher (1935), *The Design of Experiments*, Sec. 21: under H0 each d_i is symmetric about 0,
    so flipping its sign leaves the distribution unchanged. The p-value is the fraction of sign
    assignments s whose |mean(s * d)| is at least the observed |mean(d)| (with a 1e-12 relative
    tolerance for ties). For n <= ``EXACT_SIGN_FLIP_MAX_N`` all 2^n assignments are enumerated
    (exact); otherwise ``resamples`` random assignments are drawn (seeded) and
    p = (1 + #{as extreme}) / (1 + resamples), which is never 0 (Phipson & Smyth, 2010).
    """
    d = np.asarray(differences, dtype=np.float64)  # (n,)
    n = d.size
    observed = abs(d.mean())
    tolerance = 1e-12 * max(1.0, float(np.abs(d).max(initial=0.0)))
    if n <= EXACT_SIGN_FLIP_MAX_N:
        codes = np.arange(2**n)[:, None]  # (2^n, 1)
        signs = 1 - 2 * ((codes >> np.arange(n)) & 1)  # (2^n, n) every assignment of +-1
        flipped = np.abs((signs * d).mean(axis=1))  # (2^n,)
        return float(np.mean(flipped >= observed - tolerance))
    rng = np.random.default_rng(seed)
    extreme = 0
    block = max(1, 4_000_000 // n)
    for start in range(0, resamples, block):
        count = min(block, resamples - start)
        signs = rng.choice(np.array([-1.0, 1.0]), size=(count, n))  # (count, n)
        extreme += int(np.sum(np.abs((signs * d).mean(axis=1)) >= observed - tolerance))
    return (1 + extreme) / (1 + resamples)


@dataclass(frozen=True)
class PairedComparison:
    """Treated minus control over the same n prompts: ``eval.json``'s ``deltas.<metric>``."""

    mean: float  # mean difference
    stderr: float  # paired standard error (NaN for n = 1)
    ci95: tuple[float, float]  # percentile bootstrap interval over prompts
    p_value: float
    n: int
    test: str  # "mcnemar_exact" or "sign_flip"

    def record(self) -> dict[str, Any]:
        """The JSON form: ``{"mean", "stderr", "ci95": [lo, hi], "p_value", "n", "test"}``."""
        return {"mean": self.mean, "stderr": self.stderr, "ci95": list(self.ci95), "p_value": self.p_value,
                "n": self.n, "test": self.test}


def paired_comparison(treated: Sequence[float], control: Sequence[float], binary: bool = False,
                      resamples: int = 10_000, seed: int = 0) -> PairedComparison:
    """Mean difference, paired standard error, 95% bootstrap CI and p-value of treated - control.

    ``binary``: the values are 0/1 outcomes (correctness): McNemar's exact test; otherwise the
    sign-flip permutation test. Both tests and the bootstrap use ``seed``.
    """
    d = paired_differences(treated, control)  # (n,)
    mean, stderr = mean_stderr(d)
    ci = bootstrap_ci(d, resamples=resamples, seed=seed)
    if binary:
        p_value, test = mcnemar_exact([bool(v) for v in treated], [bool(v) for v in control]), "mcnemar_exact"
    else:
        p_value, test = sign_flip_p_value(d, resamples=resamples, seed=seed), "sign_flip"
    return PairedComparison(mean=mean, stderr=stderr, ci95=ci, p_value=p_value, n=int(d.size), test=test)
