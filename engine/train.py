"""The training loop, in plain sight (nanoGPT is the model).

One optimizer step = `grad_accum` micro-batches, each with loss / grad_accum so the update equals one batch of
batch_size * grad_accum; clipping, the optimizer step, the LR schedule, EMA and the step counter happen once per
optimizer step. All per-sample randomness (timestep, noise, caption dropout) is drawn from generators keyed by the
sample's global index, so how a batch is split into micro-batches (or resumed) never changes what a sample sees.

Nothing is lost: a checkpoint (engine/checkpoint.py: weights, optimizer, scheduler, TrainState, RNG states, data
position) is written every train.ckpt_every steps, at the end, and when SIGINT/SIGTERM arrives; a resumed run logs
the same losses as one that never stopped. A NaN/inf loss or gradient skips its optimizer step (counted and logged)
and max_bad_steps of them in a row stop the run without checkpointing the bad state; an out-of-memory error is
re-raised with the sizes that caused it.
"""
import copy
import hashlib
import json
import logging
import math
import os
import resource
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from .build import build_plain_model, build_training_model, latent_geometry
from .checkpoint import (FP8_STATE, CheckpointError, checkpoint_dir, prune_checkpoints, restore_fp8_state, rng_state,
                         set_rng_state)
from .config import RESUMES_KEY, ConfigError, config_to_dict
from .datasets import build_dataset, loader_for
from .diffusion import Diffusion
from .metrics import MetricsLog, truncate_metrics
from .plan import predict_memory
from .preflight import check_dataset, check_environment, check_first_batch, check_sampling, loading_errors_named
from .profiling import profile_steps
from .progress import progress_disabled
from .report import report_end, report_failure, update_report
from .sample import sample_videos, validation_prompts, write_samples
from .distributed import (DistInfo, all_reduce_mean, apply_data_parallel, apply_data_parallel_to_ema,
                          barrier, destroy_distributed, export_weights, first_sample_index, global_batch_size,
                          global_data_state, init_distributed, is_main, load_distributed, local_data_state,
                          plain_module_on_main, save_distributed, sync_context, amax_reduction_group)
from .sampler import ResumableSampler
from .text_encoder import build_text_encoder
from .vae import build_vae

log = logging.getLogger(__name__)


@dataclass
class Encoders:
    """What turns a data batch into model inputs; None where the batch already carries the encoded form."""
    vae: object
    text_encoder: object | None
    null_caption: tuple[torch.Tensor, torch.Tensor] | None  # (embeddings [L, D], mask [L]) of ""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    samples_seen: int = 0  # samples consumed (all ranks), the key of per-sample randomness
    bad_steps_in_row: int = 0
    bad_steps_total: int = 0
    stopped_by: str | None = None  # "SIGTERM" / "SIGINT" when a signal ended the run early


# ------------------------------------------------------------------------------------------- per-sample randomness
# Each (seed, sample, purpose) owns a generator on the training device, so the draws are made where they are used
# (no noise crosses PCIe, nothing waits) and stay keyed by the sample's global index: however a batch is split into
# micro-batches, ranks or resumed runs, sample i sees the same noise. A CUDA generator gives different numbers from a
# CPU one with the same seed; exactness holds per device, which is what the equality tests compare.

def sample_seed(seed: int, sample_index: int, purpose: str) -> int:
    """The 63-bit seed of one (run seed, sample, purpose): a hash, so neighbouring samples are unrelated."""
    digest = hashlib.blake2b(f"{seed}:{sample_index}:{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def sample_generator(seed: int, sample_index: int, purpose: str, device="cpu") -> torch.Generator:
    """A generator on `device` owned by one (seed, sample, purpose): reproducible however batches are split or resumed.
    Seeding is host work only (no device sync)."""
    return torch.Generator(device=device).manual_seed(sample_seed(seed, sample_index, purpose))


HIGH_NOISE_START = 0.7  # diffusion.high_noise_bias draws from the noisiest 30% of timesteps


def draw_timesteps_and_noise(shape, first_index: int, seed: int, num_timesteps: int, high_noise_bias: float = 0.0,
                             device="cpu"):
    """Per-sample timesteps [B] (int64) and noise [B, ...] (fp32) on `device` for samples first_index .. first_index +
    B - 1. With probability high_noise_bias a sample's timestep is moved into the noisiest 30%, where layout and motion
    are decided (chosen on the device: no host round trip)."""
    timesteps, noise, bias_draws = [], [], []
    for row in range(shape[0]):
        generator = sample_generator(seed, first_index + row, "diffusion", device)
        timesteps.append(torch.randint(0, num_timesteps, (1,), generator=generator, device=device))
        noise.append(torch.randn(shape[1:], generator=generator, device=device))
        bias_draws.append(torch.rand(1, generator=generator, device=device))  # drawn last: never changes the noise
    timesteps = torch.cat(timesteps)
    if high_noise_bias:
        start = int(HIGH_NOISE_START * num_timesteps)
        moved = start + timesteps % (num_timesteps - start)
        timesteps = torch.where(torch.cat(bias_draws) < high_noise_bias, moved, timesteps)
    return timesteps, torch.stack(noise)


def caption_dropout_mask(batch_size: int, first_index: int, seed: int, probability: float, device="cpu") -> torch.Tensor:
    """bool [B] on `device`: which samples train unconditionally (their caption or class replaced by the null one)."""
    draws = [torch.rand(1, generator=sample_generator(seed, first_index + row, "cfg", device), device=device)
             for row in range(batch_size)]
    return torch.cat(draws) < probability


# ------------------------------------------------------------------------------------------------ batch -> inputs

def encode_batch(batch: dict, encoders: Encoders, config, device) -> tuple[torch.Tensor, dict]:
    """A data batch -> (latents [B, F+I, C, h, w], model conditions) on `device`. The loader pins batches on CUDA,
    so every copy here is asynchronous (non_blocking): the host goes on issuing work while they travel."""
    if "latents" in batch:
        latents = batch["latents"].to(device, non_blocking=True)
    else:
        latents = encoders.vae.encode(batch["video"].to(device, non_blocking=True))
    latents = latents.float()
    if config.model.kind == "class":
        return latents, {"label": batch["label"].to(device, non_blocking=True)}
    if "caption_embeds" in batch:
        conditions = {"caption": batch["caption_embeds"].float(), "caption_mask": batch["caption_mask"]}
    else:
        embeddings, mask = encoders.text_encoder(batch["caption"])
        conditions = {"caption": embeddings, "caption_mask": mask}
    if config.data.num_images:
        if "image_caption_embeds" in batch:
            conditions["image_caption"] = batch["image_caption_embeds"].float()
            conditions["image_caption_mask"] = batch["image_caption_mask"]
        else:
            flat = [caption for captions in batch["image_captions"] for caption in captions]
            embeddings, mask = encoders.text_encoder(flat)
            conditions["image_caption"] = embeddings.unflatten(0, (latents.shape[0], -1))
            conditions["image_caption_mask"] = mask.unflatten(0, (latents.shape[0], -1))
    return latents, {k: v.to(device, non_blocking=True) for k, v in conditions.items()}


def drop_conditions(conditions: dict, drop: torch.Tensor, encoders: Encoders, config) -> dict:
    """Classifier-free guidance training: replace the dropped samples' captions (or classes) by the null one."""
    drop = drop.to(next(iter(conditions.values())).device)
    if config.model.kind == "class":
        return {"label": torch.where(drop, config.model.num_classes, conditions["label"])}
    null_embedding, null_mask = (t.to(drop.device) for t in encoders.null_caption)
    dropped = dict(conditions)
    dropped["caption"] = torch.where(drop[:, None, None], null_embedding, conditions["caption"])
    dropped["caption_mask"] = torch.where(drop[:, None], null_mask, conditions["caption_mask"])
    if "image_caption" in conditions:
        dropped["image_caption"] = torch.where(drop[:, None, None, None], null_embedding, conditions["image_caption"])
        dropped["image_caption_mask"] = torch.where(drop[:, None, None], null_mask, conditions["image_caption_mask"])
    return dropped


# --------------------------------------------------------------------------------------------------------- steps

class TrainingFault(RuntimeError):
    """The run cannot go on (e.g. NaN/inf losses in a row): one clear message, the last good checkpoint kept."""


def micro_step_loss(model, diffusion, precision, latents, conditions, first_index, config) -> torch.Tensor:
    """Mean diffusion loss of one micro-batch (per-sample noise, timesteps and caption dropout already keyed),
    a 0-dim tensor on the latents' device (never read here: reading it would make the host wait)."""
    timesteps, noise = draw_timesteps_and_noise(latents.shape, first_index, config.train.seed,
                                                diffusion.num_timesteps, config.diffusion.high_noise_bias,
                                                device=latents.device)
    x_t = diffusion.add_noise(latents, noise, timesteps)
    with precision.autocast():
        output = model(x_t, timesteps, num_images=config.data.num_images, **conditions)
    return diffusion.training_loss(output.float(), latents, noise, x_t, timesteps).mean()


def accumulate_gradients(model, batches, encoders, diffusion, precision, state, config, device,
                         info: DistInfo) -> torch.Tensor:
    """Forward + backward of grad_accum micro-batches into .grad; returns the step's mean loss over all ranks as a
    0-dim tensor on `device` (no host sync: the caller reads it once, with the gradient norm)."""
    train_cfg = config.train
    loss_sum = torch.zeros((), device=device)
    for micro in range(train_cfg.grad_accum):
        latents, conditions = encode_batch(next(batches), encoders, config, device)
        # Sample i of the run is always sample i, whichever micro-batch, rank or resumed run it lands in
        # (the sampler, in blocks of batch_size, hands this rank exactly the samples first_index .. first_index + batch_size - 1).
        first_index = first_sample_index(state.samples_seen, micro, info, train_cfg.batch_size)
        drop = caption_dropout_mask(latents.shape[0], first_index, train_cfg.seed, train_cfg.cfg_dropout, device)
        conditions = drop_conditions(conditions, drop, encoders, config)
        # DDP/FSDP reduce gradients in backward; only the last micro-batch needs it (nanoGPT's require_backward_grad_sync)
        # precision.microbatch: fp8-te casts the weights to FP8 on the first micro-batch only (is_first_microbatch)
        with sync_context(model, micro == train_cfg.grad_accum - 1), precision.microbatch(micro):
            loss = micro_step_loss(model, diffusion, precision, latents, conditions, first_index, config)
            # Each micro-batch mean / grad_accum: the summed gradients are the mean over the whole step's samples.
            (loss / train_cfg.grad_accum).backward()
        loss_sum += loss.detach()
    # Every rank sees the same mean loss, so all ranks agree on skipping a non-finite step.
    return mean_over_ranks(loss_sum / train_cfg.grad_accum, info)


def mean_over_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of a device tensor over all ranks, left on the device (an all-reduce, not a host read)."""
    if info.world_size == 1 or not torch.distributed.is_initialized():
        return value
    total = value.detach().clone()
    torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
    return total / info.world_size


def lr_factor(step: int, train) -> float:
    """Linear warmup, then constant or cosine decay to zero at max_steps."""
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    if train.lr_schedule == "cosine":
        progress = (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def build_optimizer(model, train):
    """AdamW with the multi-tensor kernels: fused (one kernel for all parameters) on CUDA, foreach elsewhere."""
    trainable = [p for p in model.parameters() if p.requires_grad]  # model.freeze: no state for frozen weights
    on_cuda = bool(trainable) and all(p.device.type == "cuda" for p in trainable)
    implementation = {"fused": True} if on_cuda else {"foreach": True}
    optimizer = torch.optim.AdamW(trainable, lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay,
                                  **implementation)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, train))
    return optimizer, scheduler


class StepResult(NamedTuple):
    loss: float  # mean loss over the step's micro-batches and ranks
    grad_norm: float  # global gradient norm before clipping
    stepped: bool  # False: non-finite loss or gradient, the update was skipped


@contextmanager
def deliberate_sync(device: torch.device):
    """Marks the step's one intended host sync, so torch.cuda.set_sync_debug_mode("error") flags any other."""
    if device.type != "cuda":
        yield
        return
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(mode)


def read_step_values(loss, grad_norm: torch.Tensor) -> tuple[float, float]:
    """(loss, grad_norm) as Python floats in ONE device->host read: the NaN guard and the logged numbers share it."""
    loss = loss.detach() if isinstance(loss, torch.Tensor) else torch.full((), loss, device=grad_norm.device)
    values = torch.stack([loss.float().to(grad_norm.device), grad_norm.detach().float()])
    with deliberate_sync(values.device):
        loss_value, norm_value = values.tolist()
    return loss_value, norm_value


def clip_gradients(model, train) -> torch.Tensor:
    """Clip the global gradient norm to train.grad_clip (0 = off); returns the norm before clipping, on the device."""
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = train.grad_clip if train.grad_clip > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: the DTensor's global value


def update_step(model, optimizer, scheduler, ema, state: TrainState, train, loss) -> StepResult:
    """Clip, one host read of (loss, grad norm), then step, schedule, EMA — once per optimizer step. A non-finite
    loss or gradient norm skips all of them, so a NaN never reaches the weights, the optimizer moments or the EMA."""
    loss_value, norm_value = read_step_values(loss, clip_gradients(model, train))
    stepped = math.isfinite(loss_value) and math.isfinite(norm_value)
    if stepped:
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update(model, state.step)
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_value, norm_value, stepped)


def train_step(train_model, model, optimizer, scheduler, ema, batches, encoders, diffusion, precision,
               state: TrainState, config, device, info: DistInfo) -> StepResult:
    """One optimizer step of the run, exactly as the loop runs it (bench/step.py times this function): grad_accum
    micro-batches of forward + backward through `train_model` (the DDP/FSDP module), then update_step on `model`.
    The host waits for the device once, in update_step; everything else is issued asynchronously."""
    loss = accumulate_gradients(train_model, batches, encoders, diffusion, precision, state, config, device, info)
    return update_step(model, optimizer, scheduler, ema, state, config.train, loss)


@contextmanager
def explain_out_of_memory(config):
    """Re-raise an out-of-memory error with the sizes that caused it and what to change."""
    try:
        yield
    except torch.OutOfMemoryError as error:
        train_cfg, data = config.train, config.data
        raise torch.OutOfMemoryError(
            f"out of memory in a training step at train.batch_size={train_cfg.batch_size}, data.frames={data.frames}, "
            f"data.resolution={data.resolution} (train.grad_accum={train_cfg.grad_accum}, "
            f"train.checkpointing={train_cfg.checkpointing}, train.precision={train_cfg.precision}); try a smaller "
            f"train.batch_size with a larger train.grad_accum (same effective batch), "
            f"train.checkpointing=selective-mlp|every-k|full, or train.precision=bf16") from error


# ----------------------------------------------------------------------------------------------- faults, signals

def count_bad_step(state: TrainState, metrics: MetricsLog, loss: float, grad_norm: float, max_bad_steps: int) -> None:
    """Record a skipped optimizer step; stop the run after max_bad_steps of them in a row."""
    state.bad_steps_in_row += 1
    state.bad_steps_total += 1
    log.warning("step %d: non-finite loss (%s) or gradient norm (%s); optimizer step skipped (%d in a row)",
                state.step + 1, loss, grad_norm, state.bad_steps_in_row)
    metrics.write({"step": state.step + 1, "event": "bad_step", "loss": repr(loss), "grad_norm": repr(grad_norm),
                   "bad_steps": state.bad_steps_total})
    if state.bad_steps_in_row >= max_bad_steps:
        raise TrainingFault(f"{state.bad_steps_in_row} optimizer steps in a row had a NaN/inf loss or gradient after "
                            f"step {state.step}; stopping (train.max_bad_steps={max_bad_steps}); the last good "
                            f"checkpoint is kept: lower train.lr, or check the data")


class PhaseInterrupted(BaseException):
    """A first SIGINT/SIGTERM during an interruptible phase (sampling): the phase stops at once, the run then stops
    as after a signal in training. A BaseException, so no `except Exception` on the way swallows it."""


class StopSignals:
    """SIGINT/SIGTERM ask the loop to stop after the current optimizer step (it then checkpoints and returns); inside
    `interruptible()` (sampling, which may take minutes) the first signal stops that phase at once instead.
    A second signal falls back to the previous handler (train.py's: stop at once), so a stuck run can still be
    stopped."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}
        self._interruptible = False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.received = signum
        if self._interruptible:
            log.warning("%s received: stopping sampling", signal.Signals(signum).name)
            raise PhaseInterrupted(signum)
        log.warning("%s received: stopping after this optimizer step and writing a checkpoint",
                    signal.Signals(signum).name)

    @contextmanager
    def interruptible(self):
        """A phase that a first signal ends at once: PhaseInterrupted, which the phase's caller catches."""
        if self.received is not None:
            raise PhaseInterrupted(self.received)
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


# ----------------------------------------------------------------------------------------------------- the run

def build_encoders(config, dataset, device) -> Encoders:
    """VAE and text encoder, loaded only when the data is not already encoded (kind=cached loads neither)."""
    cached = config.data.kind == "cached"
    vae = build_vae(config.model, device) if not cached else None
    text_encoder = None
    if config.model.kind == "t2v" and (not cached or getattr(dataset, "null_caption", None) is None):
        text_encoder = build_text_encoder(config.model, device)
    null = getattr(dataset, "null_caption", None)
    if null is None and text_encoder is not None:
        embeddings, mask = text_encoder([""])
        null = (embeddings[0], mask[0])
    if null is not None:  # on the device once, not copied into every step's caption dropout
        null = tuple(t.to(device) for t in null)
    return Encoders(vae, text_encoder, null)


def input_pipeline_warnings(config, device) -> list[str]:
    """What will make a GPU wait for its inputs, said loudly at the start of a run: encoding every clip with the VAE
    (and captions with the text encoder) inside the step, or decoding video in the training process."""
    if torch.device(device).type != "cuda":
        return []
    data, model = config.data, config.model
    warnings = []
    if data.kind != "cached" and model.vae != "identity":
        warnings.append(
            f"ENCODING LIVE: data.kind={data.kind} with model.vae={model.vae} runs the VAE"
            f"{' and the text encoder' if model.kind == 't2v' else ''} on every batch inside the training step, which "
            f"can take as long as the model's own step; encode once with `python -m ristretto.engine.cache` and train "
            f"with data.kind=cached data.cache_dir=<that folder>")
    if data.kind in ("captioned", "class_folders") and data.num_workers == 0:
        warnings.append(f"data.num_workers=0 with data.kind={data.kind}: video is decoded in the training process "
                        f"while the GPU waits; set data.num_workers to several per GPU")
    return warnings


def write_validation_samples(run_dir: Path, step: int, config, sampling_model, encoders, diffusion, precision,
                             dataset, device, metrics: MetricsLog | None = None) -> Path:
    prompts, titles = validation_prompts(config, dataset)
    vae = encoders.vae if encoders.vae is not None else build_vae(config.model, device)
    text_encoder = encoders.text_encoder or (build_text_encoder(config.model, device)
                                             if config.model.kind == "t2v" else None)
    videos = sample_videos(config, sampling_model, vae, text_encoder, diffusion, prompts, device,
                           autocast=precision.autocast).cpu()
    out_dir = run_dir / "samples" / f"step_{step}"
    write_samples(out_dir, videos, titles, config.sample.fps)
    if metrics is not None:
        metrics.videos(step, videos, titles, config.sample.fps)
    return out_dir


def all_finite(info: DistInfo, *modules) -> bool:
    """No NaN/inf in any rank's weights (FSDP: each rank checks its own shards)."""
    local = all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())
                for m in modules if m is not None for p in m.parameters())
    return all_reduce_mean(float(local), info) == 1.0


def write_checkpoint(run_dir, model, ema, optimizer, scheduler, loader, state: TrainState, config,
                     info: DistInfo) -> Path:
    """Everything a resume needs, from any number of ranks (every rank calls it); refuses weights that hold a
    NaN/inf (a poisoned state is never saved)."""
    if not all_finite(info, model, ema.model if ema is not None else None):
        raise TrainingFault(f"step {state.step}: the weights hold NaN/inf; not writing a checkpoint over good ones")
    extra = {"step": state.step, "train_state": asdict(state), "scheduler": scheduler.state_dict(),
             "loader": global_data_state(loader.state_dict(), info), "rng": rng_state(),
             "config": json.dumps(config_to_dict(config))}
    path = save_distributed(checkpoint_dir(run_dir, state.step), model, optimizer, extra,
                            ema.model if ema is not None else None, info)
    if is_main(info):
        prune_checkpoints(path.parent, config.train.keep_last)
        log.info("checkpoint: %s", path)
    return path


def resume_from(path: Path, run_dir: Path, model, ema, optimizer, scheduler, loader, info: DistInfo,
                train_cfg=None, precision=None) -> TrainState:
    """Load checkpoint `path` (written by any number of ranks) into the built run; cut metrics.jsonl to its step.
    The optimizer fields of `train_cfg` (this run's config) replace the saved ones (apply_optimizer_fields);
    `precision`'s FP8 scaling state (fp8-te delayed) comes back from the checkpoint's fp8_state.safetensors."""
    try:
        saved = load_distributed(path, model, optimizer, ema.model if ema is not None else None, info)
        if precision is not None:
            restore_fp8_state(saved.pop(FP8_STATE, None), model, precision)
        scheduler.load_state_dict(saved["scheduler"])
        if train_cfg is not None:
            apply_optimizer_fields(optimizer, scheduler, train_cfg)
        loader.load_state_dict(local_data_state(saved["loader"], info))
        set_rng_state(saved["rng"])
        state = TrainState(**saved["train_state"])
    except CheckpointError:
        raise
    except Exception as error:  # noqa: BLE001 - a checksummed file that still does not load: tampered or foreign
        raise CheckpointError(f"checkpoint {path}: cannot be loaded into this run ({type(error).__name__}: "
                              f"{' '.join(str(error).split())[:300]})") from error
    if train_cfg is not None and train_cfg.max_steps < state.step:  # before anything in the run folder changes
        raise ConfigError(f"--resume: train.max_steps={train_cfg.max_steps} is below the checkpoint's step "
                          f"{state.step} ({path}); set train.max_steps above it to train on, or start a new run")
    if is_main(info):
        dropped = truncate_metrics(run_dir / "metrics.jsonl", state.step)
        log.info("resumed from %s at step %d (%d metrics lines after it dropped)", path, state.step, dropped)
    return state


def apply_optimizer_fields(optimizer, scheduler, train_cfg) -> None:
    """After loading a checkpoint: this run's lr, betas and weight decay replace the saved ones in every param group,
    and the scheduler's base rate becomes this run's lr (its lambda already reads this run's warm-up, schedule and
    max_steps), so `--set train.lr=...` on resume is applied, not overwritten by the saved state. With unchanged
    fields this sets exactly the values that were saved."""
    for group in optimizer.param_groups:
        group["initial_lr"], group["betas"], group["weight_decay"] = train_cfg.lr, tuple(train_cfg.betas), \
            train_cfg.weight_decay
    scheduler.base_lrs = [train_cfg.lr for _ in optimizer.param_groups]
    rates = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, rate in zip(optimizer.param_groups, rates):
        group["lr"] = rate
    scheduler._last_lr = rates  # what get_last_lr() reports for the next step (torch keeps it in this attribute)


def flat_config(values: dict) -> dict:
    return {f"{section}.{k}": v for section, fields in values.items() if isinstance(fields, dict)
            for k, v in fields.items()}


def write_run_config(run_dir: Path, config, resumed_from: Path | None, step: int) -> dict:
    """config.json = this run's config, plus a "resumes" history: per resume, its step, checkpoint and the fields it
    changed from the config before it ({key: [old, new]}). Returns the newest history entry (or {}). Written to a
    temporary name and renamed, so a kill never leaves half a config."""
    path = run_dir / "config.json"
    values = config_to_dict(config)
    history, entry = [], {}
    if resumed_from is not None and path.is_file():
        previous = json.loads(path.read_text(encoding="utf-8"))
        history = previous.get(RESUMES_KEY, [])
        old, new = flat_config(previous), flat_config(values)
        changed = {key: [old.get(key), value] for key, value in new.items() if old.get(key) != value}
        entry = {"step": step, "checkpoint": str(resumed_from), "changed": changed,
                 "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        history = [*history, entry]
    tmp = path.with_name(f".config.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(values | ({RESUMES_KEY: history} if history else {}), indent=2) + "\n")
    tmp.replace(path)
    return entry


def step_record(state, loss, lr, grad_norm, samples_per_s, tokens_per_sample, device) -> dict:
    record = {"step": state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "samples_per_s": samples_per_s,
              "tokens_per_s": samples_per_s * tokens_per_sample, "bad_steps": state.bad_steps_total}
    if device.type == "cuda":
        record["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    else:  # the process's peak resident memory (Linux reports KiB)
        record["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return record


def train(config, run_dir: Path, resume: Path | None = None, on_start=None) -> TrainState:
    """Train `config` into `run_dir` (config.json, metrics.jsonl, checkpoints/, samples/, weights/), continuing
    from checkpoint folder `resume` when given. Under torchrun every rank calls it (dist.strategy); rank 0 writes.
    Every check runs before the first file is written; `on_start()` is called once they passed, just before the
    run's files are written and training begins. Returns the final TrainState (`stopped_by` set after a signal)."""
    info = init_distributed(config.dist.strategy, config.train.device)

    begun = False  # a bad input stops before the run's first file: then no report is written either

    def begin() -> None:  # every check passed; the run's files are about to be written
        nonlocal begun
        begun = True
        if on_start is not None:
            on_start()

    try:
        state = train_on_ranks(config, Path(run_dir), resume, info, begin)
    except BaseException as error:  # report.html says how a started run ended, then the error goes on to the caller
        if is_main(info) and begun:
            report_failure(Path(run_dir), error)
        raise
    else:
        if is_main(info):
            report_end(Path(run_dir), state)
        barrier(info)  # every rank done with every collective before any tears its groups down
        return state
    finally:
        destroy_distributed()


def train_on_ranks(config, run_dir: Path, resume: Path | None, info: DistInfo, on_start=None) -> TrainState:
    torch.manual_seed(config.train.seed)  # the same initial weights on every rank (FSDP shards each rank's copy)
    device, main = info.device, is_main(info)
    check_environment(config, device)
    train_cfg = config.train
    dataset = build_dataset(config)
    check_dataset(config, dataset, info.world_size)
    check_first_batch(config, dataset)
    sampler = ResumableSampler(len(dataset), train_cfg.seed, rank=info.rank, world_size=info.world_size,
                               block=train_cfg.batch_size, tag_epochs=getattr(dataset, "epoch_tagged_indices", False))
    loader = loader_for(config, dataset, sampler, device)
    for warning in input_pipeline_warnings(config, device):
        log.warning(warning)
    with loading_errors_named(f"model.vae={config.model.vae!r} / model.text_encoder={config.model.text_encoder!r}"):
        encoders = build_encoders(config, dataset, device)
    diffusion = Diffusion(config.diffusion)
    check_sampling(config, diffusion)
    model, ema, precision = build_training_model(config, device, pretrained=resume is None)
    precision.fp8_group = amax_reduction_group(info)
    # The optimizer, EMA, checkpoints and sampling use `model`; forward + backward go through the DDP/FSDP module.
    train_model = apply_data_parallel(model, info, mixed_precision=train_cfg.precision != "fp32")
    if ema is not None:
        apply_data_parallel_to_ema(ema.model, info)
    optimizer, scheduler = build_optimizer(model, train_cfg)
    state = TrainState()
    if resume is not None:
        state = resume_from(resume, run_dir, model, ema, optimizer, scheduler, loader, info, train_cfg, precision)
    if on_start is not None:
        on_start()
    resume_entry = {}
    if main:  # the run's first files: only now that every check has passed
        run_dir.mkdir(parents=True, exist_ok=True)
        resume_entry = write_run_config(run_dir, config, resume, state.step)
        if resume is None:  # `--resume auto` restarting a run that stopped before its first checkpoint
            truncate_metrics(run_dir / "metrics.jsonl", 0)
    metrics = MetricsLog(run_dir, config.log, config_to_dict(config), enabled=main)
    if resume is not None:
        metrics.write({"step": state.step, "event": "resume", "checkpoint": str(resume),
                       "changed": resume_entry.get("changed", {})})
    samples_per_step = global_batch_size(train_cfg.batch_size, train_cfg.grad_accum, info)
    if main:
        log.info("predicted peak memory per process (engine/plan.py):\n%s", predict_memory(config, device.type).format())
    log.info("model: %.2fM parameters; global batch %d = %d per rank x %d micro-batches x %d ranks (%s); run dir %s",
             sum(p.numel() for p in model.parameters()) / 1e6, samples_per_step, train_cfg.batch_size,
             train_cfg.grad_accum, info.world_size, info.strategy, run_dir)

    def checkpoint():
        return write_checkpoint(run_dir, model, ema, optimizer, scheduler, loader, state, config, info)

    def validation_samples():
        """Rank 0 samples from a plain copy of the EMA weights (gathered under FSDP) while the others wait."""
        sampling_model = plain_module_on_main(ema.model if ema else model, lambda: build_plain_model(config), info)
        if sampling_model is not None and next(sampling_model.parameters()).device.type != device.type:
            sampling_model = copy.deepcopy(sampling_model).to(device)  # train.ema_on_cpu: sample on the device
        out_dir = None
        if main:
            try:  # a signal here ends sampling at once; the loop then stops as after a signal in a step
                with signals.interruptible():
                    out_dir = write_validation_samples(run_dir, state.step, config, sampling_model, encoders,
                                                       diffusion, precision, dataset, device, metrics)
                    if config.sample.quality_seeds:
                        log_quality(config, state.step, sampling_model, encoders, diffusion, precision, device,
                                    metrics)
                    if state.step < train_cfg.max_steps:  # at the last step the end-of-run report follows at once
                        update_report(run_dir, "running", state.step)
            except PhaseInterrupted:
                out_dir = None
        barrier(info)
        model.train()
        return out_dir

    batches = iter(loader)
    _, frames_tokens = latent_geometry(config)
    tokens_per_sample = (config.data.frames + config.data.num_images) * (frames_tokens // config.model.patch_size) ** 2
    window_start, window_steps = time.perf_counter(), 0
    model.train()
    with StopSignals() as signals, metrics, tqdm(total=train_cfg.max_steps, initial=state.step, desc="train",
                                                  unit="step", dynamic_ncols=True,
                                                  disable=progress_disabled() if main else True) as progress, \
            profile_steps(run_dir, config.profile.steps if main else 0) as profiler:
        while state.step < train_cfg.max_steps and not stop_requested(signals, info):
            lr = scheduler.get_last_lr()[0]  # the rate this step uses
            with explain_out_of_memory(config):
                loss, grad_norm, stepped = train_step(train_model, model, optimizer, scheduler, ema, batches,
                                                      encoders, diffusion, precision, state, config, device, info)
            profiler.step()
            state.samples_seen += samples_per_step  # consumed even when skipped: a resume must not replay them
            if not stepped:
                count_bad_step(state, metrics, loss, grad_norm, train_cfg.max_bad_steps)
                continue
            state.bad_steps_in_row = 0
            state.step += 1
            window_steps += 1
            progress.update(1)
            if state.step == 2 and device.type == "cuda" and main:  # the planner's prediction, checked
                log.info("measured peak memory after 2 steps: %.2f GiB", torch.cuda.max_memory_allocated(device) / 2**30)
            if state.step % train_cfg.log_every == 0 or state.step == train_cfg.max_steps:
                samples_per_s = window_steps * samples_per_step / (time.perf_counter() - window_start)
                metrics.write(step_record(state, loss, lr, grad_norm, samples_per_s, tokens_per_sample, device))
                progress.set_postfix(step=state.step, loss=f"{loss:.4f}", samples_s=f"{samples_per_s:.1f}")
                window_start, window_steps = time.perf_counter(), 0
            if train_cfg.ckpt_every and state.step % train_cfg.ckpt_every == 0 and state.step < train_cfg.max_steps:
                checkpoint()
            if train_cfg.sample_every and state.step % train_cfg.sample_every == 0 and state.step < train_cfg.max_steps:
                validation_samples()
        progress.close()
        path = checkpoint()
        if signals.received is not None or stop_requested(signals, info):
            return stopped(state, signals, f"checkpoint {path}")
        export_weights(run_dir / "weights", model, ema.model if ema else None, info)
        out_dir = validation_samples()
        if signals.received is not None or stop_requested(signals, info):  # during the export or the final samples
            return stopped(state, signals, f"checkpoint {path} and weights in {run_dir / 'weights'}; final samples "
                                           f"not written")
    log.info("done: %d steps; samples in %s", state.step, out_dir)
    return state


def log_quality(config, step, sampling_model, encoders, diffusion, precision, device, metrics) -> None:
    """The synthetic task's automatic score (held-out captions): colour / direction / shape accuracy."""
    from ristretto.bench.quality import quality_metrics  # noqa: PLC0415 - only synthetic runs need the scorer

    scores = quality_metrics(config, sampling_model, encoders.vae, encoders.text_encoder, diffusion, device,
                             seeds=config.sample.quality_seeds, autocast=precision.autocast)
    metrics.write({"step": step, **{f"quality/{key}": value for key, value in scores.items()}})
    update_report(metrics.path.parent, "running", step)  # again, now with this validation's scores
    log.info("step %d held-out quality: colour %.0f%%, direction %.0f%%, shape %.0f%%", step,
             100 * scores["colour_accuracy"], 100 * scores["direction_accuracy"], 100 * scores["shape_accuracy"])


def stopped(state: TrainState, signals: StopSignals, kept: str) -> TrainState:
    state.stopped_by = signal.Signals(signals.received).name if signals.received else "a signal on another rank"
    log.warning("stopped by %s at step %d; %s", state.stopped_by, state.step, kept)
    return state


def stop_requested(signals: StopSignals, info: DistInfo) -> bool:
    """Whether any rank got SIGINT/SIGTERM: all ranks must stop at the same step, or their collectives hang."""
    return all_reduce_mean(float(signals.received is not None), info) > 0
