"""Training: the micro-step's forward and objectives, the optimizer, parallel strategies, checkpoints."""
