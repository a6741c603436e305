"""Train a Latte video diffusion transformer: `python train.py [--preset NAME] [--set key=value ...] [--out DIR]`.

With no arguments: the tiny text-to-video preset on built-in synthetic clips, on CPU, in a few minutes.
"""
import sys

from ristretto.engine.cli import main

if __name__ == "__main__":
    sys.exit(main())
