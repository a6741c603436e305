"""Train a Latte video diffusion transformer: `python train.py [--preset NAME] [--set key=value ...] [--out DIR]`.

With no arguments: the tiny text-to-video preset on built-in synthetic clips, on CPU, in a few minutes.
"""
import os
import sys

# Before any CUDA allocation: expandable segments keep the caching allocator's fragmentation small on video-sized,
# varying activations (engine/plan.py plans with that margin). A value the user set wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

if __name__ == "__main__":
    try:  # a Ctrl-C before main() has its own handlers (while Python imports it) is one line too
        from ristretto.engine.cli import main
    except KeyboardInterrupt:
        print("error: interrupted by SIGINT during start-up; nothing was written", file=sys.stderr)
        sys.exit(130)
    sys.exit(main())
