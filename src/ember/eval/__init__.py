"""Evaluation: validation metrics during training (``validate``); the full metric suite and cross-validation build on it."""
