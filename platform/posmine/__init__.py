"""posmine: positive-aware hard-negative mining and contrastive fine-tuning, on Ray."""

__version__ = "0.1.0"
