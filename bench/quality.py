"""Does a run draw what its captions say? Colour, direction and shape accuracy of samples on the synthetic task.

`python -m ristretto.bench.quality --run DIR [--seeds 4] [--split heldout] [--out FILE] [--sheet PNG]` loads a run's
EMA weights, samples every caption of the split (held-out: the caption combinations the synthetic dataset never
trains on) with `--seeds` noise seeds, reads each video with engine/synthetic.score_video and prints a table; --out
writes the numbers as JSON (with the environment), --sheet a contact sheet of the first seed's samples.

Inside a training run, `quality_metrics(config, model, vae, text_encoder, diffusion, device)` returns the same dict.
Chance is 1/6 for colour, 1/4 for direction and 1/3 for shape.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ristretto.engine.progress import progress_bar
from ristretto.engine.sample import sample_videos
from ristretto.engine.synthetic import all_captions, score_against_captions, split_captions

SPLITS = ("heldout", "train", "all")
CHANCE = {"colour_accuracy": 1 / 6, "direction_accuracy": 1 / 4, "shape_accuracy": 1 / 3}


def split_caption_list(split: str = "heldout") -> list[str]:
    """The captions of `split`. SyntheticClips trains on split_captions()'s first list (seed 0, colour-direction
    holdout) whatever train.seed is, so the held-out captions are that call's second list."""
    if split not in SPLITS:
        raise ValueError(f"quality: split {split!r}; expected one of {', '.join(SPLITS)}")
    if split == "all":
        return all_captions()
    train, heldout = split_captions()
    return heldout if split == "heldout" else train


@torch.no_grad()
def sample_for_scoring(config, model, vae, text_encoder, diffusion, captions: list[str], device, seeds: int = 4,
                       guidance: float | None = None, steps: int | None = None, first_seed: int | None = None,
                       autocast=None) -> tuple[torch.Tensor, list[str]]:
    """Videos [seeds * len(captions), F, 3, H, W] on CPU (seed-major) and the caption of each."""
    first_seed = config.sample.seed if first_seed is None else first_seed
    videos = [sample_videos(config, model, vae, text_encoder, diffusion, captions, device, steps=steps,
                            guidance=guidance, seed=first_seed + k, autocast=autocast).cpu()
              for k in progress_bar(range(seeds), desc=f"quality: {len(captions)} captions x seed", unit="seed",
                                    leave=False)]
    return torch.cat(videos), captions * seeds


def quality_metrics(config, model, vae, text_encoder, diffusion, device, captions: list[str] | None = None,
                    seeds: int = 4, guidance: float | None = None, steps: int | None = None,
                    autocast=None) -> dict:
    """Sample `captions` (default: the held-out ones) with `seeds` seeds and score them: {"colour_accuracy",
    "direction_accuracy", "shape_accuracy", "n"} (fractions in [0, 1], n videos), plus "sample_s" (wall seconds).

    Leaves the model in eval mode; a training loop calls model.train() afterwards, as it does after sampling."""
    if config.model.kind != "t2v" or config.data.kind != "synthetic":
        raise ValueError(f"quality_metrics: needs a text-to-video run on synthetic data, got model.kind="
                         f"{config.model.kind!r}, data.kind={config.data.kind!r}")
    captions = split_caption_list("heldout") if captions is None else list(captions)
    model.eval()
    start = time.perf_counter()
    videos, expected = sample_for_scoring(config, model, vae, text_encoder, diffusion, captions, device, seeds,
                                          guidance, steps, autocast=autocast)
    scores = score_against_captions(list(videos), expected)
    scores["sample_s"] = time.perf_counter() - start
    return scores


def evaluate_run(run_dir: Path, seeds: int = 4, split: str = "heldout", guidance: float | None = None,
                 steps: int | None = None, sheet: Path | None = None) -> dict:
    """Load a run's EMA weights and score `split`; the result names the run, split, guidance and steps used."""
    from ristretto.engine.config import config_from_dict  # noqa: PLC0415
    from ristretto.engine.run_assets import load_inference_model  # noqa: PLC0415
    from ristretto.engine.video_io import contact_sheet  # noqa: PLC0415

    config_path = Path(run_dir) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"quality: {config_path} not found: --run must be a run directory")
    config = config_from_dict(json.loads(config_path.read_text()))
    model, vae, text_encoder, diffusion, device = load_inference_model(config, Path(run_dir))
    captions = split_caption_list(split)
    guidance = config.diffusion.guidance_scale if guidance is None else guidance
    steps = steps or config.diffusion.sample_steps
    videos, expected = sample_for_scoring(config, model, vae, text_encoder, diffusion, captions, device, seeds,
                                          guidance, steps)
    scores = score_against_captions(list(videos), expected)
    if sheet is not None:
        Path(sheet).parent.mkdir(parents=True, exist_ok=True)
        contact_sheet(Path(sheet), list(videos[: len(captions)]), captions, cell=32)
    return {"run": str(run_dir), "split": split, "seeds": seeds, "guidance": guidance, "sample_steps": steps,
            "captions": len(captions), **scores}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ristretto.bench.quality", description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="run directory (config.json + weights/)")
    parser.add_argument("--seeds", type=int, default=4, help="noise seeds per caption (default 4)")
    parser.add_argument("--split", choices=SPLITS, default="heldout", help="captions to sample (default heldout)")
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the run's)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's)")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON to this file")
    parser.add_argument("--sheet", type=Path, default=None, help="write a contact sheet PNG of the first seed")
    args = parser.parse_args(argv)
    if args.seeds <= 0:
        parser.error(f"--seeds: must be positive, got {args.seeds}")
    try:
        result = evaluate_run(args.run, args.seeds, args.split, args.guidance, args.steps, args.sheet)
    except (FileNotFoundError, ValueError) as error:
        print(f"quality: {error}", file=sys.stderr)
        return 2
    from .common import environment_info, format_table  # noqa: PLC0415

    print(format_table([{k: result[k] for k in ("split", "n", "colour_accuracy", "direction_accuracy",
                                                 "shape_accuracy", "guidance", "sample_steps")}]))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"environment": environment_info(), **result}, indent=2) + "\n")
        print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
