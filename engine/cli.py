"""`python train.py [--preset NAME] [--set key=value ...] [--out DIR] [--resume auto|DIR]`: parse, build the config,
train.

User mistakes (a bad key or value, an unknown preset, an unusable output folder, a resume from a run of another model
shape) end with one line on stderr and exit code 2, before anything is written. A run that stops on a fault (NaN/inf
losses in a row, out of memory) prints one line and exits 1; one stopped by SIGINT/SIGTERM writes a checkpoint, prints
how to resume and exits 128 + the signal number (130, 143), so a wrapper script can tell "resume me" from "finished".

Resume: `--resume auto --out DIR` continues DIR from its newest good checkpoint (a fresh run when DIR holds no run
yet); `--resume DIR` takes a checkpoint folder or a run folder. Without --preset/--set the saved config.json is used
as is; with them, the new config must give the same model shape (other fields, e.g. train.max_steps, may change).
"""
import argparse
import datetime
import json
import logging
import os
import signal
import sys
from pathlib import Path

from .config import DEFAULT_PRESET, PRESETS, ConfigError, build_config, config_from_dict, config_to_dict

EXIT_USAGE = 2
EXIT_FAULT = 1
# Fields that do not change the model's parameters or the shape of what it sees: free to differ on resume.
SHAPE_FREE_MODEL_FIELDS = ("attention_backend", "kernels")
SHAPE_DATA_FIELDS = ("frames", "resolution", "num_images")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="train.py", description="Train a Latte video diffusion transformer.")
    parser.add_argument("--preset", default=None, help=f"one of: {', '.join(PRESETS)} (default: {DEFAULT_PRESET}, "
                                                       "or the resumed run's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set train.lr=1e-4 (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<preset>-<time>)")
    parser.add_argument("--resume", default=None, metavar="auto|DIR",
                        help="continue a run: auto = newest good checkpoint of --out; or a checkpoint / run folder")
    return parser.parse_args(argv)


def check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_probe-{os.getpid()}"  # per process: torchrun ranks probe at the same time
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"--out {run_dir}: cannot write there ({error.strerror})") from None


def check_run_dir(run_dir: Path) -> None:
    """Refuse to reuse a folder that already holds a run, or one we cannot write."""
    if (run_dir / "config.json").exists():
        raise ConfigError(f"--out {run_dir}: already holds a run (config.json); choose a new folder or pass "
                          f"--resume auto")
    check_writable(run_dir)


def shape_fields(values: dict) -> dict:
    """The config fields (as a flat dict) that decide the model's parameter shapes and its input size."""
    model = {f"model.{k}": v for k, v in values["model"].items() if k not in SHAPE_FREE_MODEL_FIELDS}
    return model | {f"data.{k}": values["data"][k] for k in SHAPE_DATA_FIELDS}


def check_same_shape(config, saved: dict, saved_path: Path) -> None:
    """One line naming the first field that differs from the saved run's in model shape."""
    new, old = shape_fields(config_to_dict(config)), shape_fields(saved)
    for key in new:
        if new[key] != old.get(key):
            raise ConfigError(f"--resume: {key}={new[key]!r} but {saved_path} has {old.get(key)!r}; a resumed run "
                              f"must keep the model shape (start a new run with a new --out instead)")


def find_resume_checkpoint(spec: str, out: Path | None) -> tuple[Path, Path | None]:
    """(run dir, checkpoint folder or None for a fresh start) for --resume `spec`."""
    from .checkpoint import MANIFEST, CheckpointError, latest_checkpoint, verify_checkpoint  # noqa: PLC0415

    if spec == "auto":
        if out is None:
            raise ConfigError("--resume auto: needs --out DIR, the run to continue")
        if not (out / "config.json").is_file():
            logging.getLogger(__name__).info("--resume auto: %s holds no run yet; starting a new one", out)
            return out, None
        checkpoint = latest_checkpoint(out)
        if checkpoint is None:
            raise ConfigError(f"--resume auto: no good checkpoint under {out / 'checkpoints'}; start a new run with a "
                              f"new --out")
        return out, checkpoint
    path = Path(spec)
    if (path / MANIFEST).is_file():  # a checkpoint folder: <run>/checkpoints/step_N
        try:
            verify_checkpoint(path)
        except CheckpointError as error:
            raise ConfigError(f"--resume: {error}") from None
        return out or path.parent.parent, path
    if (path / "config.json").is_file():  # a run folder
        checkpoint = latest_checkpoint(path)
        if checkpoint is None:
            raise ConfigError(f"--resume {path}: no good checkpoint under {path / 'checkpoints'}")
        return out or path, checkpoint
    raise ConfigError(f"--resume {path}: neither a checkpoint (no {MANIFEST}) nor a run folder (no config.json)")


def resume_config(args, run_dir: Path, checkpoint: Path):
    """The config to continue with: the saved one, or preset + --set checked against it for the model shape."""
    saved_path = run_dir / "config.json"
    if not saved_path.is_file():  # forking a checkpoint into a new --out: compare with the checkpoint's run
        saved_path = checkpoint.parent.parent / "config.json"
    try:
        saved = json.loads(saved_path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"--resume: cannot read {saved_path} ({error})") from None
    if args.preset is None and not args.overrides:
        return config_from_dict(saved)
    config = build_config(args.preset or saved.get("preset", "tiny-t2v"), args.overrides)
    check_same_shape(config, saved, saved_path)
    return config


def check_loggers(config) -> None:
    """An asked-for logger whose package is missing is a user error, named before anything starts."""
    import importlib.util  # noqa: PLC0415

    for enabled, module, package in ((config.log.tensorboard, "tensorboard", "tensorboard"),
                                     (config.log.wandb, "wandb", "wandb")):
        if enabled and importlib.util.find_spec(module) is None:
            raise ConfigError(f"log.{module}=true needs the {package} package: pip install {package} "
                              f"(or pip install -e '.[log]')")


def prepare(args):
    """(config, run dir, checkpoint to resume or None); every user mistake is a ConfigError, nothing written yet."""
    if args.resume is not None:
        run_dir, checkpoint = find_resume_checkpoint(args.resume, args.out)
        if checkpoint is not None:
            config = resume_config(args, run_dir, checkpoint)
            if run_dir != checkpoint.parent.parent:  # a new run started from another run's checkpoint
                check_run_dir(run_dir)
            check_writable(run_dir)
            check_loggers(config)
            return config, run_dir, checkpoint
    config = build_config(args.preset or DEFAULT_PRESET, args.overrides)
    if args.out is None and "WORLD_SIZE" in os.environ:
        raise ConfigError("--out: required under torchrun, so that every rank writes to the same run folder")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = args.out or Path("runs") / f"{config.preset}-{stamp}"
    check_loggers(config)
    check_run_dir(run_dir)
    return config, run_dir, None


def main(argv=None) -> int:
    args = parse_args(argv)
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 speaks for the run
    logging.basicConfig(level=logging.INFO if main_rank else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config, run_dir, checkpoint = prepare(args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    import torch  # noqa: PLC0415 - heavy imports only once the arguments are known to be good

    from .distributed import DistributedError  # noqa: PLC0415
    from .train import TrainingFault, train  # noqa: PLC0415

    try:
        state = train(config, run_dir, resume=checkpoint)
    except DistributedError as error:  # e.g. dist.strategy=ddp without torchrun: a setup mistake, nothing trained
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (TrainingFault, torch.OutOfMemoryError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAULT
    if state.stopped_by is not None:
        print(f"stopped by {state.stopped_by} at step {state.step}; resume with: "
              f"python train.py --resume auto --out {run_dir}", file=sys.stderr)
        return 128 + signal.Signals[state.stopped_by].value
    if main_rank:
        print(f"run written to {run_dir}")
    return 0
