"""Memory-lean per-token log-probability kernels (see kernels/README.md)."""

from kernels.logprob import available_impls, default_impl, linear_logprob, logprob_gather

__all__ = ["logprob_gather", "linear_logprob", "available_impls", "default_impl"]
