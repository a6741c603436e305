"""`python train.py [--preset NAME] [--set key=value ...] [--out DIR]`: parse, build the config, train.

User mistakes (a bad key or value, an unknown preset, an unusable output folder) end with one line on stderr and a
non-zero exit, never a traceback.
"""
import argparse
import datetime
import logging
import sys
from pathlib import Path

from .config import PRESETS, ConfigError, build_config

EXIT_USAGE = 2


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="train.py", description="Train a Latte video diffusion transformer.")
    parser.add_argument("--preset", default="tiny-t2v", help=f"one of: {', '.join(PRESETS)} (default: tiny-t2v)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set train.lr=1e-4 (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<preset>-<time>)")
    return parser.parse_args(argv)


def check_run_dir(run_dir: Path) -> None:
    """Refuse to reuse a folder that already holds a run, or one we cannot write."""
    if (run_dir / "config.json").exists():
        raise ConfigError(f"--out {run_dir}: already holds a run (config.json); choose a new folder")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_probe"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"--out {run_dir}: cannot write there ({error.strerror})") from None


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = build_config(args.preset, args.overrides)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = args.out or Path("runs") / f"{config.preset}-{stamp}"
        check_run_dir(run_dir)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    from .train import train  # noqa: PLC0415 - heavy imports only once the arguments are known to be good

    train(config, run_dir)
    print(f"run written to {run_dir}")
    return 0
