"""Experiments across runs: sweeps over hyperparameters and data formats, and comparisons."""
