"""Training checkpoints that survive a kill: everything needed to continue a run exactly where it stopped.

A checkpoint is a folder `<run>/checkpoints/step_<N>/`:
    model.safetensors   live weights (plain: the same keys whatever the precision)
    ema.safetensors     EMA weights (when the run keeps an EMA)
    fp8_state.safetensors  fp8-te delayed scaling's per-module scales and amax histories (precision.fp8_scaling_state),
                        so a resumed FP8 run quantises exactly as the uninterrupted one (absent for other precisions)
    state.pt            optimizer, LR scheduler, TrainState, RNG states (torch, CUDA, numpy, python), data position,
                        the run config; plain containers and tensors only, loaded with torch.load(weights_only=True)
    manifest.json       step + sha256 of every file above; written last
The folder is written under a temporary name (`.tmp-step_<N>-<pid>`), every file fsync'd, then renamed in one step:
a kill during the write leaves only a temporary folder, which loading ignores and the next save removes. A checkpoint
whose manifest is missing, whose files do not match their checksums, or which holds a .safetensors/.pt file
the manifest does not list (it would be loaded unverified) is reported with its path and skipped.
Nothing here unpickles: weights are safetensors, the rest goes through torch.load(weights_only=True).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from .precision import fp8_scaling_state, load_fp8_scaling_state
from .weights import plain_state

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
STATE = "state.pt"
FORMAT_VERSION = 1
# Test hook: seconds to sleep after the weights are written and before the manifest + rename (a window to kill in).
WRITE_DELAY_ENV = "RISTRETTO_TEST_CHECKPOINT_WRITE_DELAY"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: names its path and what is wrong."""


FP8_STATE = "fp8_state"  # fp8_state.safetensors, and its key in load_distributed's returned dict


def restore_fp8_state(state: dict[str, torch.Tensor] | None, model, precision) -> None:
    """Put a checkpoint's FP8 scaling state back into `model` (unwrapped) when this run keeps one: without it TE
    would restart from scale 1 and an empty amax history, and small weights would underflow in e4m3 for a while."""
    keeps_state = precision.te_recipe is not None and precision.recipe == "delayed"
    if keeps_state and state:
        restored = load_fp8_scaling_state(model, state, precision.te_recipe)
        log.info("FP8 scaling state restored for %d Transformer Engine linears", restored)
    elif keeps_state:
        log.warning("the checkpoint holds no FP8 scaling state (written by another precision or recipe): FP8 scales "
                    "restart from 1 and recalibrate over the first steps")
    elif state:
        log.info("the checkpoint's FP8 scaling state is not used by train.precision=%s (recipe %s)",
                 precision.name, precision.recipe)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:08d}"


# ---------------------------------------------------------------------------------------------------- RNG state

def rng_state() -> dict:
    """Every global RNG a training step might touch, as tensors and plain Python values (weights_only-loadable)."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state((numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------------ writing

def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk, so a rename never publishes unwritten bytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, step: int, model, ema, training_state: dict, keep_last: int = 2) -> Path:
    """Write checkpoint `step` of a single-process model atomically and prune old ones; returns its folder.

    `training_state` holds everything but the weights (optimizer, scheduler, train_state, loader, rng, config).
    keep_last: how many older checkpoints survive next to the new one.
    """
    weights = {"model": plain_state(model)} | ({"ema": plain_state(ema.model)} if ema is not None else {})
    weights |= {FP8_STATE: fp8} if (fp8 := fp8_scaling_state(model)) else {}
    final = write_checkpoint_folder(checkpoint_dir(run_dir, step), step, weights, training_state)
    prune_checkpoints(final.parent, keep_last)
    return final


def write_checkpoint_folder(final: Path, step: int, weights: dict[str, dict], training_state: dict) -> Path:
    """The one atomic writer: <name>.safetensors per entry of `weights` (plain CPU tensors), state.pt, then the
    manifest of checksums, all in a temporary folder that is fsync'd and renamed to `final`."""
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, state in weights.items():
        save_file(state, str(tmp / f"{name}.safetensors"), metadata={"format": "pt"})
    torch.save(training_state, tmp / STATE)
    if os.environ.get(WRITE_DELAY_ENV):
        time.sleep(float(os.environ[WRITE_DELAY_ENV]))
    files = sorted(p.name for p in tmp.iterdir())
    manifest = {"format": FORMAT_VERSION, "step": step, "files": {name: sha256_of(tmp / name) for name in files}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    for name in files + [MANIFEST]:
        fsync_path(tmp / name)
    fsync_path(tmp)
    if final.exists():  # the same step written again (e.g. a resumed run that stops where it resumed): swap it out
        stale = root / f".old-{final.name}-{os.getpid()}"
        final.rename(stale)
        tmp.rename(final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        tmp.rename(final)
    fsync_path(root)
    return final


def prune_checkpoints(root: Path, keep_last: int) -> None:
    """Keep the newest checkpoint and `keep_last` older ones; remove leftovers of interrupted writes. Only finished
    checkpoints and the leftovers of dead processes are touched: a `.tmp-*`/`.old-*` folder whose writer (the PID in
    its name) is alive is someone's write in progress (the run lock makes that rare; this makes it harmless)."""
    for leftover in [*root.glob(".tmp-*"), *root.glob(".old-*")]:
        if not writer_alive(leftover):
            shutil.rmtree(leftover, ignore_errors=True)
    for old in list_checkpoints(root.parent)[: -(max(keep_last, 0) + 1)]:
        shutil.rmtree(old, ignore_errors=True)


def writer_alive(leftover: Path) -> bool:
    """Whether the process named at the end of a temporary folder's name (`.tmp-step_N-<pid>`) still runs."""
    pid = leftover.name.rsplit("-", 1)[-1]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------------------------------------------ reading

def list_checkpoints(run_dir: Path) -> list[Path]:
    """Published checkpoint folders of a run, oldest first (temporary folders excluded)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def verify_checkpoint(path: Path) -> dict:
    """The manifest of checkpoint `path` when every file matches its checksum; CheckpointError naming it otherwise."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"checkpoint {path}: no readable {MANIFEST} ({error})") from None
    if not isinstance(files, dict):
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} has no file list")
    unlisted = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".pt") and p.name not in files)
    if unlisted:  # a file the loader would read without a checksum (e.g. ema.safetensors dropped from the list)
        raise CheckpointError(f"checkpoint {path}: {unlisted[0]} is not in {MANIFEST} (unverified file)")
    for name, expected in files.items():
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path}: {name} is missing")
        if sha256_of(path / name) != expected:
            raise CheckpointError(f"checkpoint {path}: {name} does not match its checksum (truncated or corrupt)")
    if "model.safetensors" not in files or STATE not in files:
        raise CheckpointError(f"checkpoint {path}: manifest lists no model.safetensors or {STATE}")
    return manifest


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that passes its checksums; each bad one on the way is reported with its path."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as error:
            log.warning("%s; falling back to the previous checkpoint", error)
    return None


def load_training_state(path: Path) -> dict:
    """state.pt of a verified checkpoint: plain containers and tensors only (torch.load weights_only=True)."""
    return torch.load(Path(path) / STATE, map_location="cpu", weights_only=True)
