"""lm: train ChatGPT-style language models end to end with PyTorch Lightning."""

__version__ = "0.1.0"
