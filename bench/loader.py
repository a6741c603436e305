"""Does the input pipeline keep up? Clips/s out of the training DataLoader vs the clips/s the step consumes.

    python -m ristretto.bench.loader [--preset P] [--set key=value ...] [--workers 0,2,8] [--batches N]
        [--consume SAMPLES_PER_S | --step-json bench/results/step_h100.json] [--out DIR]

The loader is built exactly as engine/train.py builds it (engine/datasets.loader_for, the data.* settings: workers,
prefetch, pinned memory on CUDA, persistent workers) for each --workers count, and timed over --batches batches
after one warm-up batch (which includes starting the workers). The step's consumption is --consume, or the best
samples/s of a bench/step.py JSON. A row "keeps up" when the loader delivers at least what the step consumes; for
live-encoding runs (not data.kind=cached) the VAE/text-encoder time is on top of this, inside the step.
"""
import argparse
import json
import time
from pathlib import Path

import torch

from ristretto.bench.common import format_table, write_results
from ristretto.engine.config import build_config
from ristretto.engine.datasets import build_dataset, loader_for
from ristretto.engine.sampler import ResumableSampler


def clips_per_second(config, workers: int, batches: int, device) -> float:
    """Clips/s delivered by the training loader of `config` with `workers` workers, after one warm-up batch."""
    config.data.num_workers = workers
    dataset = build_dataset(config)
    sampler = ResumableSampler(len(dataset), config.train.seed, block=config.train.batch_size,
                               tag_epochs=getattr(dataset, "epoch_tagged_indices", False))
    iterator = iter(loader_for(config, dataset, sampler, device))
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * config.train.batch_size / (time.perf_counter() - start)


def step_consumption(args) -> float | None:
    """Samples/s the step consumes: --consume, or the best row of a bench/step.py JSON."""
    if args.consume:
        return args.consume
    if args.step_json:
        rows = json.loads(Path(args.step_json).read_text())["rows"]
        return max((row["samples/s"] for row in rows if "samples/s" in row), default=None)
    return None


def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = build_config(args.preset, args.set)
    consumed = step_consumption(args)
    rows = []
    for workers in args.workers:
        row = {"preset": args.preset, "data.kind": config.data.kind, "workers": workers,
               "batch": config.train.batch_size, "clips/s": clips_per_second(config, workers, args.batches, device)}
        if consumed:
            row["step consumes/s"] = consumed
            row["keeps up"] = row["clips/s"] >= consumed
        rows.append(row)
    print(format_table(rows))
    payload = {"config": {"preset": args.preset, "overrides": args.set, "batches": args.batches,
                          "device": device.type}, "rows": rows}
    if args.out is not None:
        print(f"wrote {write_results('loader', payload, args.out)}")
    return payload


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-t2v")
    parser.add_argument("--set", action="append", default=[], help="key=value overrides, as for train.py")
    parser.add_argument("--workers", type=lambda s: [int(w) for w in s.split(",")], default=[0, 2, 8],
                        help="comma-separated data.num_workers values to time")
    parser.add_argument("--batches", type=int, default=20, help="timed batches after one warm-up batch")
    parser.add_argument("--consume", type=float, default=0.0, help="samples/s the training step consumes")
    parser.add_argument("--step-json", default=None, help="a bench/step.py JSON to take the consumption from")
    parser.add_argument("--out", type=Path, default=None, help="write loader_<device>.json here")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
