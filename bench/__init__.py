"""Benchmarks of mipo against TRL's DPOTrainer (``make bench``; see bench/README.md)."""
