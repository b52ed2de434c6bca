"""Training: pretraining loop, run folders, checkpoints, data parallelism (paper §2)."""
