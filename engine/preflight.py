"""Checks that need more than the config (the machine, the dataset, the sampler), run before the first file of a run
is written, so a mistake never costs a training step or leaves a half-made run folder. Pure config rules live in
config.validate; these raise the same ConfigError, one line naming the field and what to change."""
from __future__ import annotations

import importlib.util
import logging
import os
import time
from contextlib import contextmanager

import torch

from .config import ConfigError
from .precision import FP8_BACKENDS, check_fp8_device, resolve_recipe

log = logging.getLogger(__name__)
# Test hook: seconds to pause at the start of set-up (a window to send a signal in, as a slow data or model load).
SETUP_DELAY_ENV = "RISTRETTO_TEST_SETUP_DELAY"


def check_environment(config, device: torch.device) -> None:
    """The GPU and packages the config asks for are here."""
    if os.environ.get(SETUP_DELAY_ENV):
        log.warning("test hook: pausing set-up for %s s", os.environ[SETUP_DELAY_ENV])
        time.sleep(float(os.environ[SETUP_DELAY_ENV]))
    precision, kernels = config.train.precision, config.model.kernels
    if precision in FP8_BACKENDS and not config.train.fp8_emulate:  # torchao's emulation runs on any device
        if device.type != "cuda":
            raise ConfigError(f"train.precision={precision}: FP8 training needs an Ada/Hopper or newer CUDA GPU; this "
                              f"run is on {device.type}: use train.precision=bf16 or fp32")
        module, install = FP8_BACKENDS[precision]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"train.precision={precision} needs the {module} package: {install}")
        try:
            check_fp8_device(device, precision, resolve_recipe(precision, config.train.fp8_recipe))
        except (RuntimeError, ValueError) as error:
            raise ConfigError(str(error)) from None
    if kernels == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(f"model.kernels=triton: the Triton kernels need a CUDA GPU and this run is on "
                          f"{device.type}; use model.kernels=torch (the same ops in PyTorch)")
    temporal = config.model.temporal_attention
    if temporal == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(f"model.temporal_attention=triton: the Triton kernel needs a CUDA GPU and this run is on "
                          f"{device.type}; use model.temporal_attention=attention_backend")
    if config.train.compile and device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise ConfigError("train.compile=true needs the triton package on a GPU: pip install triton")


def check_sampling(config, diffusion) -> None:
    """The validation sampler accepts diffusion.sample_steps on this schedule (else the first validation would fail
    after training steps that are then lost)."""
    try:
        sampler = diffusion.sampler()
        sampler.set_timesteps(config.diffusion.sample_steps)
    except (ValueError, RuntimeError) as error:
        raise ConfigError(f"diffusion.sample_steps={config.diffusion.sample_steps} with diffusion.sampler="
                          f"{config.diffusion.sampler}: {' '.join(str(error).split())}") from None


def dataset_class_count(dataset) -> int | None:
    """How many classes the dataset's labels span (max label + 1), counted without decoding a sample; None when the
    dataset does not say."""
    if hasattr(dataset, "classes"):  # class folders
        return len(dataset.classes)
    entries = getattr(dataset, "entries", None)
    if entries is not None:  # manifest rows
        return max(entry.label for entry in entries) + 1 if entries else 0
    if hasattr(dataset, "manifest") and hasattr(dataset, "_shard"):  # cached latents: read the small labels tensors
        from safetensors import safe_open  # noqa: PLC0415

        highest = -1
        for shard in dataset.manifest["shards"]:
            with safe_open(str(dataset.dir / shard["file"]), framework="pt") as handle:
                labels = handle.get_tensor("labels")
            highest = max(highest, int(labels.max()) if labels.numel() else -1)
        return highest + 1
    from .synthetic import NUM_CLASSES, SyntheticClips  # noqa: PLC0415

    return NUM_CLASSES if isinstance(dataset, SyntheticClips) else None


def check_dataset(config, dataset, world_size: int) -> None:
    """Enough samples for one batch on every rank, and (class-conditional) no label beyond model.num_classes: the
    label num_classes is the guidance null class, so a class there would silently train as "no class"."""
    needed = config.train.batch_size * world_size
    if len(dataset) < needed:
        raise ConfigError(f"data: the dataset ({config.data.kind}) has {len(dataset)} samples, fewer than one batch "
                          f"(train.batch_size={config.train.batch_size} x {world_size} processes); lower "
                          f"train.batch_size or add data")
    if config.model.kind != "class":
        return
    count = dataset_class_count(dataset)
    if count is not None and count > config.model.num_classes:
        names = getattr(dataset, "classes", None)
        extra = f" (the last: {names[config.model.num_classes:][:3]})" if names else ""
        raise ConfigError(f"model.num_classes={config.model.num_classes}: the dataset ({config.data.kind}) has "
                          f"{count} classes{extra}; set --set model.num_classes={count}")


def check_first_batch(config, dataset) -> None:
    """File-backed datasets: read one batch now, so a manifest of only unreadable files (or a missing folder behind
    it) is a set-up error, before anything is written, not a fault at the first step. Their items are keyed by
    (seed, index), so this read changes no randomness of the run."""
    from .video_data import SkippingDataset  # noqa: PLC0415

    if isinstance(dataset, SkippingDataset):
        dataset.__getitems__(list(range(min(len(dataset), config.train.batch_size))))


@contextmanager
def loading_errors_named(fields: str):
    """A model that cannot be loaded (a wrong path or hub id, no network, a folder without config.json) is the
    user's to fix: one ConfigError naming the fields, instead of the loader's traceback."""
    try:
        yield
    except ConfigError:
        raise
    except (OSError, ValueError, ImportError) as error:
        raise ConfigError(f"{fields}: cannot load ({' '.join(str(error).split())[:300]})") from None
