"""Does a numerics change (FP8, a kernel, the residual dtype) train like the baseline? Paired loss curves over seeds.

`python -m ristretto.bench.loss_parity --baseline RUN [RUN ...] --candidate RUN [RUN ...] [--window 100]
[--at 250,500,1000,2000,3000] [--phases 200-1000,1100-2000,2100-3000] [--label NAME] [--out DIR]`

Runs are paired by `train.seed` (config.json): both runs of a seed see the same data, noise, timesteps and caption
dropout, so their losses differ only by the change. One logged loss is one batch's and too noisy to compare alone:
the **window loss** at step s is the mean of the logged losses at steps s-window < step <= s. Printed per seed: the
window loss of both runs at each `--at` step and their ratio, and per phase the mean (min..max) of the candidate's
window-loss ratio over the windows ending in the phase; then the same over seeds, and the held-out quality of each run
where `bench.quality` left RUN/quality.json. A bf16 run against another bf16 run that differs only in rounding
(eager vs `train.compile=true`) gives the noise floor any change has to be judged against. Writes the tables as JSON
(with the environment) to DIR/loss_parity_<label>_<device>.json (default runs/bench). docs/precision.md holds a
measured table (emulated FP8 vs bf16).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean

from ristretto.bench.common import format_table, write_results

QUALITY_KEYS = ("colour_accuracy", "direction_accuracy", "shape_accuracy")


class RunError(ValueError):
    """A run directory this tool cannot read, named in the message."""


def run_losses(run: Path) -> dict[int, float]:
    """step -> logged training loss; a step logged twice (a resume that repeats steps) keeps its last value."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise RunError(f"{run}: no metrics.jsonl (not a training run directory?)")
    losses = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise RunError(f"{path}:{number}: not JSON ({error.msg})") from None
        if "loss" in record and "step" in record:
            losses[int(record["step"])] = float(record["loss"])
    if not losses:
        raise RunError(f"{path}: no training losses logged")
    return losses


def run_seed(run: Path) -> int:
    path = run / "config.json"
    if not path.is_file():
        raise RunError(f"{run}: no config.json (not a training run directory?)")
    return int(json.loads(path.read_text())["train"]["seed"])


def run_quality(run: Path) -> dict[str, float] | None:
    path = run / "quality.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    return {key: report[key] for key in QUALITY_KEYS if key in report} | {"videos": report.get("n")}


def window_loss(losses: dict[int, float], end: int, window: int) -> float | None:
    """Mean logged loss over steps end-window < step <= end; None when no loss was logged there."""
    inside = [loss for step, loss in losses.items() if end - window < step <= end]
    return mean(inside) if inside else None


def pair_by_seed(baselines: list[Path], candidates: list[Path]) -> dict[int, tuple[Path, Path]]:
    """seed -> (baseline run, candidate run); every run must have a partner of the same seed."""
    by_seed = {}
    for role, runs in (("baseline", baselines), ("candidate", candidates)):
        seen = {}
        for run in runs:
            seed = run_seed(run)
            if seed in seen:
                raise RunError(f"{role} runs {seen[seed]} and {run} both have train.seed={seed}")
            seen[seed] = run
        by_seed[role] = seen
    unpaired = set(by_seed["baseline"]) ^ set(by_seed["candidate"])
    if unpaired:
        lonely = [str(runs[seed]) for runs in by_seed.values() for seed in unpaired if seed in runs]
        raise RunError(f"no partner with the same train.seed for: {', '.join(lonely)}")
    return {seed: (by_seed["baseline"][seed], by_seed["candidate"][seed]) for seed in sorted(by_seed["baseline"])}


def ratio(candidate: float | None, baseline: float | None) -> float | None:
    return None if candidate is None or baseline is None else candidate / baseline - 1


def phase_ratios(base: dict[int, float], cand: dict[int, float], phase: tuple[int, int],
                 window: int) -> list[float]:
    """Candidate/baseline - 1 of the window losses of every window ending at a multiple of `window` in the phase."""
    first = -(-phase[0] // window) * window
    ratios = [ratio(window_loss(cand, end, window), window_loss(base, end, window))
              for end in range(first, phase[1] + 1, window)]
    return [r for r in ratios if r is not None]


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f}%"


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{percent(mean(values))} ({100 * min(values):+.1f}..{100 * max(values):+.1f})"


def compare(pairs: dict[int, tuple[Path, Path]], at: list[int], phases: list[tuple[int, int]], window: int) -> dict:
    """Per-seed and over-seed comparison (the JSON this bench writes)."""
    if not pairs:
        raise RunError("no runs to compare")
    seeds, phase_means = [], {f"{a}-{b}": [] for a, b in phases}
    for seed, (base_run, cand_run) in pairs.items():
        base, cand = run_losses(base_run), run_losses(cand_run)
        row = dict(seed=seed, baseline=str(base_run), candidate=str(cand_run),
                   last_step=min(max(base), max(cand)), at={}, phases={},
                   quality=dict(baseline=run_quality(base_run), candidate=run_quality(cand_run)))
        for step in at:
            b, c = window_loss(base, step, window), window_loss(cand, step, window)
            row["at"][step] = dict(baseline=b, candidate=c, ratio=ratio(c, b))
        for (first, last), name in zip(phases, phase_means):
            ratios = phase_ratios(base, cand, (first, last), window)
            row["phases"][name] = dict(mean=mean(ratios) if ratios else None, ratios=ratios)
            if ratios:
                phase_means[name].append(mean(ratios))
        seeds.append(row)
    over_seeds = {name: (mean(values) if len(values) == len(seeds) else None) for name, values in phase_means.items()}
    at_means = {}
    for step in at:
        ratios = [row["at"][step]["ratio"] for row in seeds]
        at_means[step] = mean(ratios) if None not in ratios else None
    return dict(window=window, seeds=seeds, phase_mean_over_seeds=over_seeds, at_mean_over_seeds=at_means)


def loss_rows(result: dict) -> list[dict]:
    rows = []
    for row in result["seeds"]:
        cells = dict(seed=row["seed"])
        for step, values in row["at"].items():
            base, cand = values["baseline"], values["candidate"]
            cells[f"@{step}"] = "-" if base is None else (f"{base:.4f} -> {cand:.4f} ({percent(values['ratio'])})"
                                                          if cand is not None else f"{base:.4f} -> -")
        for name, phase in row["phases"].items():
            cells[f"windows {name}"] = spread(phase["ratios"])
        rows.append(cells)
    mean_row = dict(seed="mean")
    mean_row.update({f"@{step}": percent(value) for step, value in result["at_mean_over_seeds"].items()})
    mean_row.update({f"windows {name}": percent(value) for name, value in result["phase_mean_over_seeds"].items()})
    return rows + [mean_row]


def quality_rows(result: dict) -> list[dict]:
    rows = []
    for row in result["seeds"]:
        for role in ("baseline", "candidate"):
            quality = row["quality"][role]
            if quality is not None:
                scores = {key.split("_")[0]: f"{100 * quality[key]:.1f}%" for key in QUALITY_KEYS if key in quality}
                rows.append(dict(seed=row["seed"], run=role, **scores, videos=quality["videos"]))
    return rows


def parse_phases(text: str) -> list[tuple[int, int]]:
    phases = []
    for part in text.split(","):
        try:
            first, last = (int(v) for v in part.split("-"))
        except ValueError:
            raise SystemExit(f"--phases: expected FIRST-LAST steps separated by commas, got {part!r}") from None
        phases.append((first, last))
    return phases


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m ristretto.bench.loss_parity", description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", nargs="+", type=Path, required=True, help="baseline run directories")
    parser.add_argument("--candidate", nargs="+", type=Path, required=True, help="candidate run directories")
    parser.add_argument("--window", type=int, default=100, help="steps per window loss (default 100)")
    parser.add_argument("--at", default="250,500,1000,2000,3000", help="steps to show the window loss at")
    parser.add_argument("--phases", default="200-1000,1100-2000,2100-3000", help="FIRST-LAST step ranges")
    parser.add_argument("--label", default="candidate", help="name of the comparison in the JSON file name")
    parser.add_argument("--out", default=None, help="directory for the JSON (default runs/bench)")
    args = parser.parse_args(argv)
    try:
        result = compare(pair_by_seed(args.baseline, args.candidate), [int(s) for s in args.at.split(",")],
                         parse_phases(args.phases), args.window)
    except RunError as error:
        raise SystemExit(f"loss_parity: {error}") from None
    print(f"window loss (mean of logged losses over {args.window} steps): baseline -> candidate (candidate vs "
          "baseline); windows: mean (min..max) of the candidate's ratio over the windows ending in the phase")
    print(format_table(loss_rows(result)))
    quality = quality_rows(result)
    if quality:
        print("\nheld-out quality (bench.quality)")
        print(format_table(quality))
    print(f"\nwrote {write_results(f'loss_parity_{args.label}', result, args.out)}")
    return result


if __name__ == "__main__":
    main()
