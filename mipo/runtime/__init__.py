"""Runtime: files and caches on disk, torchrun ranks, metrics logging, the one error type for bad input."""
