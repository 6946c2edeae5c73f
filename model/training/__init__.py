"""Training LayerDiff: configuration, MLCID data loading, the objective, the trainer, checkpoints, EMA, the small VAE."""
