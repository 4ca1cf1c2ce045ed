"""Training: typed configs, data, the trainer loop, checkpoints, metrics and evaluation."""
