"""The pipeline's stages (sample, reference, train, evaluate, pipeline), their cache keys, and the entry points' setup."""
