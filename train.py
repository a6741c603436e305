"""Train a Latte video diffusion transformer: `python train.py [--preset NAME] [--set key=value ...] [--out DIR]`.

With no arguments: the tiny text-to-video preset on built-in synthetic clips, on CPU, in a few minutes.
"""
import os
import sys

# Before any CUDA allocation: expandable segments keep the caching allocator's fragmentation small on video-sized,
# varying activations (engine/plan.py plans with that margin). A value the user set wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

from ristretto.engine.cli import main  # noqa: E402 - after the allocator setting

if __name__ == "__main__":
    sys.exit(main())
