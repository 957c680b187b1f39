"""lm: train ChatGPT-style language models end to end with PyTorch Lightning."""

import time

__version__ = "0.1.0"

# Taken before any heavy import, so "seconds since launch" in the logs includes start-up and compilation.
LAUNCHED_AT = time.time()
