"""`python train.py [--preset NAME] [--set key=value ...] [--out DIR] [--resume auto|DIR] [--debug]`: parse, build the
config, lock the run folder, train.

Every expected error (a bad key or value, an unknown preset, an unusable or busy output folder, a resume from a run
of another model shape, bad data, a missing GPU or package) ends with one line `error: ...` on stderr naming the
field, file or line, and exit code 2; nothing is left behind that a plain rerun would refuse (docs/reliability.md).
A run that stops on a fault once training has started (NaN/inf losses in a row, out of memory, a batch of unreadable
files, a full disk) prints one line and exits 1; one stopped by SIGINT/SIGTERM writes a checkpoint (when training had
started), prints how to resume and exits 128 + the signal number (130, 143); a second signal stops at once.
`--debug` (or RISTRETTO_DEBUG=1) shows the traceback instead.

One writer per run folder: train.py holds an fcntl lock on <run>/.lock (engine/run_lock.py) from before it writes
anything until it exits; a second trainer or resume on the folder stops at once naming the holder's PID.

Resume: `--resume auto --out DIR` continues DIR from its newest good checkpoint (a fresh run when DIR holds no run
yet, or a restart from its saved config when the run stopped before its first checkpoint); `--resume DIR` takes a
checkpoint folder or a run folder. The resumed config is the saved config.json plus this invocation's --set
overrides: fields that change the model's shape or which samples a step sees (batch size, grad_accum, seed) are
refused with one line; the optimizer fields (lr, betas, weight decay, warm-up, schedule, max_steps) are applied to
the restored optimizer and scheduler. config.json keeps a "resumes" history of what each resume changed.
"""
import argparse
import datetime
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from .config import (DEFAULT_PRESET, PRESETS, ConfigError, apply_override, build_config, config_from_dict,
                     config_to_dict, validate)
from .run_lock import LOCK_FILE, RunLock

EXIT_USAGE = 2
EXIT_FAULT = 1
DEBUG_ENV = "RISTRETTO_DEBUG"
# Fields that do not change the model's parameters or the shape of what it sees: free to differ on resume.
SHAPE_FREE_MODEL_FIELDS = ("attention_backend", "temporal_attention", "kernels")
SHAPE_DATA_FIELDS = ("frames", "resolution", "num_images")
# Fields a resume must keep: they decide which samples each optimizer step sees (per-sample noise is keyed by the
# sample's index), so changing them would not continue the run but start another one from its weights.
RESUME_FIXED_FIELDS = ("train.batch_size", "train.grad_accum", "train.seed")


class Interrupted(BaseException):
    """SIGINT/SIGTERM outside the training loop (set-up, or a second signal): stop at once."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def raise_interrupted(signum, frame):
    raise Interrupted(signum)


def busy_cpus(allowed: set[int], window_s: float = 0.3) -> float:
    """How many of the `allowed` CPUs other work keeps busy right now: their non-idle share of a short window in
    /proc/stat. Not the 1-minute load average, which still counts work that ended up to a minute ago (measured: 0.95
    on an idle 2-core machine just after a test run, so a fresh run took one thread and ran 1.4x slower). Where
    /proc/stat is missing (macOS), the load average it is."""
    try:
        before = _cpu_times(allowed)
        time.sleep(window_s)
        after = _cpu_times(allowed)
    except (OSError, ValueError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    busy = 0.0
    for cpu, (idle, total) in after.items():
        idle_then, total_then = before.get(cpu, (idle, total))
        if total > total_then:
            busy += 1.0 - (idle - idle_then) / (total - total_then)
    return busy


def _cpu_times(allowed: set[int], path: str = "/proc/stat") -> dict[int, tuple[int, int]]:
    """(idle + iowait, total) jiffies of each allowed CPU."""
    times = {}
    with open(path, encoding="ascii") as stat:
        for line in stat:
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in allowed:
                values = [int(v) for v in fields[:8]]
                times[int(name[3:])] = (values[3] + values[4], sum(values))
    if not times:
        raise ValueError(f"{path}: none of CPUs {sorted(allowed)}")
    return times


def idle_cpus() -> int:
    """CPUs this process may run on (its affinity: a container's or taskset's share, not all the host's) that other
    work is not using now (busy_cpus), at least one."""
    allowed = os.sched_getaffinity(0)
    busy = round(busy_cpus(allowed))
    return max(1, min(len(allowed), len(allowed) - busy))


def configure_openmp() -> int | None:
    """The CPU threads this run will use, unless the user set OMP_NUM_THREADS (then None): one per idle CPU.
    Measured on 2 cores with the default run (samples/s): idle machine, 2 threads with OpenMP's default short spin
    239, 2 threads with a passive wait 126, 1 thread 173; one core busy with other work, 1 thread 198, 2 passive 167,
    2 spinning 80. Spinning threads pay off only on idle cores, so on a loaded machine we use fewer threads and make
    them sleep when idle (OMP_WAIT_POLICY=PASSIVE) unless the user chose a policy. OpenMP reads the policy once, when
    torch is first imported: main() calls this before anything imports torch."""
    if "OMP_NUM_THREADS" in os.environ:
        return None
    threads = idle_cpus()
    if threads < len(os.sched_getaffinity(0)):
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return threads


def configure_threads(threads: int | None) -> None:
    """torch's intra-op threads as configure_openmp() chose (None: the user's OMP_NUM_THREADS stands)."""
    if threads is not None:
        import torch  # noqa: PLC0415

        torch.set_num_threads(threads)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="train.py", description="Train a Latte video diffusion transformer.")
    parser.add_argument("--preset", default=None, help=f"one of: {', '.join(PRESETS)} (default: {DEFAULT_PRESET}, "
                                                       "or the resumed run's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set train.lr=1e-4 (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<preset>-<time>)")
    parser.add_argument("--resume", default=None, metavar="auto|DIR",
                        help="continue a run: auto = newest good checkpoint of --out; or a checkpoint / run folder")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of an error instead of one line (or set {DEBUG_ENV}=1)")
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
    """One line naming the first field that differs from the saved run's in model shape, or in the fields that
    decide which samples a step sees."""
    new, old = shape_fields(config_to_dict(config)), shape_fields(saved)
    for key in new:
        if new[key] != old.get(key):
            raise ConfigError(f"--resume: {key}={new[key]!r} but {saved_path} has {old.get(key)!r}; a resumed run "
                              f"must keep the model shape (start a new run with a new --out instead)")
    new_values = config_to_dict(config)
    for key in RESUME_FIXED_FIELDS:
        section, name = key.split(".")
        if new_values[section][name] != saved.get(section, {}).get(name):
            raise ConfigError(f"--resume: {key}={new_values[section][name]!r} but {saved_path} has "
                              f"{saved.get(section, {}).get(name)!r}; it decides which samples each step sees, so a "
                              f"resumed run keeps it (start a new run with a new --out to change it)")
    if (config.train.ema_decay > 0) != (saved["train"]["ema_decay"] > 0):
        raise ConfigError(f"--resume: train.ema_decay={config.train.ema_decay} but {saved_path} has "
                          f"{saved['train']['ema_decay']}; a resumed run cannot add or drop its EMA")


def find_resume_checkpoint(spec: str, out: Path | None, lock) -> tuple[Path, Path | None]:
    """(run dir, checkpoint folder or None for a fresh start) for --resume `spec`; `lock(run_dir)` is called once the
    run folder is known and before its checkpoints are read, so no other writer is changing them."""
    from .checkpoint import (MANIFEST, CheckpointError, latest_checkpoint, list_checkpoints,  # noqa: PLC0415
                             verify_checkpoint)

    if spec == "auto":
        if out is None:
            raise ConfigError("--resume auto: needs --out DIR, the run to continue")
        lock(out)
        if not (out / "config.json").is_file():
            logging.getLogger(__name__).info("--resume auto: %s holds no run yet; starting a new one", out)
            return out, None
        checkpoint = latest_checkpoint(out)
        if checkpoint is None and not list_checkpoints(out):
            logging.getLogger(__name__).warning("--resume auto: %s stopped before its first checkpoint; starting it "
                                                "again from its config.json", out)
            return out, None
        if checkpoint is None:
            raise ConfigError(f"--resume auto: no good checkpoint under {out / 'checkpoints'}; start a new run with a "
                              f"new --out")
        return out, checkpoint
    path = Path(spec)
    if (path / MANIFEST).is_file():  # a checkpoint folder: <run>/checkpoints/step_N
        lock(out or path.parent.parent)
        try:
            verify_checkpoint(path)
        except CheckpointError as error:
            raise ConfigError(f"--resume: {error}") from None
        return out or path.parent.parent, path
    if (path / "config.json").is_file():  # a run folder
        lock(out or path)
        checkpoint = latest_checkpoint(path)
        if checkpoint is None:
            raise ConfigError(f"--resume {path}: no good checkpoint under {path / 'checkpoints'}")
        return out or path, checkpoint
    raise ConfigError(f"--resume {path}: neither a checkpoint (no {MANIFEST}) nor a run folder (no config.json)")


def read_saved_config(saved_path: Path) -> dict:
    try:
        saved = json.loads(saved_path.read_text(encoding="utf-8"))
        config_from_dict(saved)  # a config.json that no longer parses is named here, not deep in the run
    except (OSError, ValueError) as error:
        raise ConfigError(f"--resume: cannot read {saved_path} ({error})") from None
    return saved


def resume_config(args, run_dir: Path, checkpoint: Path | None):
    """The config to continue with: the saved one plus this invocation's --set overrides, checked against it."""
    saved_path = run_dir / "config.json"
    if not saved_path.is_file():  # forking a checkpoint into a new --out: continue the checkpoint's run's config
        saved_path = checkpoint.parent.parent / "config.json"
    saved = read_saved_config(saved_path)
    saved_preset = saved.get("preset", "tiny-t2v")
    if args.preset is not None and args.preset != saved_preset:
        raise ConfigError(f"--preset {args.preset}: {saved_path} is a {saved_preset} run; a resume continues its saved "
                          f"config (change fields with --set, or start a new run with a new --out)")
    config = config_from_dict(saved)
    for assignment in args.overrides:
        apply_override(config, assignment)
    validate(config)
    if checkpoint is not None:
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


def prepare(args, lock=None):
    """(config, run dir, checkpoint to resume or None); every user mistake is a ConfigError. `lock(run_dir)` (by
    default: nothing) takes the run folder before anything in it is read for writing."""
    lock = lock or (lambda run_dir: None)
    if args.resume is not None:
        run_dir, checkpoint = find_resume_checkpoint(args.resume, args.out, lock)
        if checkpoint is not None or (run_dir / "config.json").is_file():
            config = resume_config(args, run_dir, checkpoint)
            if checkpoint is not None and run_dir != checkpoint.parent.parent:  # a new run from another's checkpoint
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
    lock(run_dir)
    if args.resume is None:
        check_run_dir(run_dir)
    check_writable(run_dir)
    return config, run_dir, None


class RunFolder:
    """The run folder as this process found it, so a start that fails can leave it as it was: a folder it created
    is removed, and in a folder that was there only its own lock file is."""

    def __init__(self):
        self.lock: RunLock | None = None
        self.created = self.lock_created = False

    def take(self, run_dir: Path) -> None:
        if self.lock is not None or os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 holds the lock
            return
        self.created = not run_dir.exists()
        self.lock_created = not (run_dir / LOCK_FILE).exists()
        try:
            self.lock = RunLock(run_dir, "--out").acquire()
        except OSError as error:
            raise ConfigError(f"--out {run_dir}: cannot write there ({error.strerror})") from None

    def undo(self) -> None:
        """After a failed start: remove what this process made (nothing else was written before training)."""
        if self.lock is None:
            return
        run_dir = self.lock.run_dir
        if self.created:
            shutil.rmtree(run_dir, ignore_errors=True)
        elif self.lock_created:
            (run_dir / LOCK_FILE).unlink(missing_ok=True)
        self.lock.release()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def one_line(error: BaseException) -> str:
    """The error as one line: OSErrors name their file and reason, everything else its message."""
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror}"
    message = str(error)
    if "Original Traceback" in message:  # re-raised from a DataLoader worker: keep the original error's last line
        last = message.strip().splitlines()[-1]
        name, _, rest = last.partition(": ")
        message = rest if name.split(".")[-1] == type(error).__name__ else last
    return " ".join(message.split()) or type(error).__name__


@contextmanager
def stop_at_once_on_signals():
    """Until the training loop takes them over (and after it), SIGINT/SIGTERM raise Interrupted: set-up stops at
    once with one line and exit 130/143."""
    if threading.current_thread() is not threading.main_thread():  # handlers live in the main thread only
        yield
        return
    previous = {signum: signal.signal(signum, raise_interrupted) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv=None) -> int:
    threads = configure_openmp()
    args = parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 speaks for the run
    logging.basicConfig(level=logging.INFO if main_rank else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    folder, started, run_dir = RunFolder(), [], args.out
    with stop_at_once_on_signals():
        try:
            config, run_dir, checkpoint = prepare(args, folder.take)
            configure_threads(threads)
            from .train import train  # noqa: PLC0415 - heavy imports only once the arguments are known to be good

            state = train(config, run_dir, resume=checkpoint, on_start=lambda: started.append(True))
        except (Interrupted, KeyboardInterrupt, Exception) as error:  # noqa: BLE001 - sorted in exit_after
            if not started:
                folder.undo()  # a failed start leaves the folder as it found it
            return exit_after(error, bool(started), run_dir, debug)
        finally:
            folder.release()
    if state.stopped_by is not None:
        print(f"stopped by {state.stopped_by} at step {state.step}; resume with: "
              f"python train.py --resume auto --out {run_dir}", file=sys.stderr)
        signals = signal.Signals.__members__
        return 128 + (signals[state.stopped_by] if state.stopped_by in signals else signal.SIGINT)
    if main_rank:
        print(f"run written to {run_dir}")
    return 0


def exit_after(error: BaseException, started: bool, run_dir: Path | None, debug: bool) -> int:
    """One `error:` line and the exit code for an error that ended the run; a bug (or --debug) keeps its
    traceback."""
    if isinstance(error, (Interrupted, KeyboardInterrupt)):
        signum = error.signum if isinstance(error, Interrupted) else signal.SIGINT
        name = signal.Signals(signum).name
        if started:
            print(f"error: stopped at once by a second {name}; resume from the last checkpoint with: "
                  f"python train.py --resume auto --out {run_dir}", file=sys.stderr)
        else:
            print(f"error: interrupted by {name} during set-up; nothing was trained", file=sys.stderr)
        return 128 + signum
    expected = (ConfigError, OSError, ImportError, *loaded_errors(USER_ERRORS), *loaded_errors(FAULTS))
    if debug or not (isinstance(error, expected) or names_a_field(error)):
        raise error
    print(f"error: {one_line(error)}", file=sys.stderr)
    return EXIT_FAULT if started or isinstance(error, loaded_errors(FAULTS)) else EXIT_USAGE


CONFIG_SECTIONS = ("model.", "train.", "data.", "diffusion.", "sample.", "log.", "dist.", "profile.")


def names_a_field(error: BaseException) -> bool:
    """Errors raised for the user name the config field first (the project's convention, e.g. precision.py's
    "train.precision='fp8-te': ..." or the attention backends' "model.attention_backend=..."): those are user
    errors wherever they come from; anything else is a bug and keeps its traceback."""
    return isinstance(error, (ValueError, RuntimeError, KeyError)) and str(error).startswith(CONFIG_SECTIONS)


# Errors whose message is meant for the user, by module (looked up only in modules already imported: they import torch).
USER_ERRORS = (("ristretto.engine.checkpoint", "CheckpointError"), ("ristretto.engine.distributed", "DistributedError"))
FAULTS = (("ristretto.engine.train", "TrainingFault"), ("torch", "OutOfMemoryError"))


def loaded_errors(names) -> tuple[type, ...]:
    return tuple(getattr(sys.modules[module], name) for module, name in names if module in sys.modules)
