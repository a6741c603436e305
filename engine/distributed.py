"""Data parallelism for the train loop: the same train.py under `torchrun` with DDP or FSDP2 equals a 1-process run.

Small functions the loop calls (torchtitan-style `apply_*`, plain arguments, no hidden globals):

    info = init_distributed(config.dist.strategy)          # torchrun env -> process group, device, strategy
    model, ema, precision = build_training_model(config, info.device)
    train_model = apply_data_parallel(model, info, mixed_precision=config.train.precision != "fp32")
    apply_data_parallel_to_ema(ema.model, info)             # FSDP: shard the EMA like the model (same names)
    sampler = ResumableSampler(len(dataset), seed, rank=info.rank, world_size=info.world_size,
                               block=config.train.batch_size)
    ... per micro-batch:  first = first_sample_index(state.samples_seen, micro, info, batch_size)
                          with sync_context(train_model, micro == grad_accum - 1): forward + backward
    ... once per step:    update_step(model, ...)   # the unwrapped module: same Parameters, plain names
                          state.samples_seen += global_batch_size(batch_size, grad_accum, info)

Order of the seams (engine/build.py does the first four, this file the last):
    FP8 converters -> activation checkpointing -> torch.compile (per block) -> FSDP/DDP
FSDP2 must come last: `fully_shard` turns each block's parameters into DTensor shards and hooks the block's forward to
all-gather them, so it has to see the final modules (te.Linear / Float8Linear already swapped in, checkpointed forwards
already in place, blocks already compiled). DDP likewise wraps the finished model. Nothing here touches the model code.

Global batch = per-rank batch x grad_accum x world_size. The per-sample randomness (noise, timestep, caption dropout;
engine/train.py keys it by a sample's global index) and the data must agree across world sizes: see
`global_sample_index` and `ResumableSampler(block=batch_size)`.

Checkpoints (`save_distributed` / `load_distributed`) gather full, plain state dicts on rank 0 through
torch.distributed.checkpoint.state_dict (get/set_model_state_dict, get/set_optimizer_state_dict, FQN-keyed), write
them in the single-process layout of engine/checkpoint.py (model.safetensors, ema.safetensors, state.pt,
manifest.json) and broadcast them back shard by shard on load; so a checkpoint written by N ranks (DDP or FSDP)
loads on M ranks or in one plain process, and its model.safetensors is the export. docs/scaling.md says when to
switch to sharded DCP files instead.
"""
from __future__ import annotations

import gc
import logging
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import FP8_STATE, STATE, CheckpointError, verify_checkpoint, write_checkpoint_folder
from .precision import EXTRA_STATE_SUFFIX, fp8_scaling_state, ignoring_te_extra_state, plain_tensor

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "none", "ddp", "fsdp")
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """A distributed setup that cannot work: one line naming the setting or variable and what was expected."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    """This process's index among all processes (0 = the one that logs, samples and writes)."""
    world_size: int
    """Number of processes (ranks) training together; 1 without torchrun."""
    local_rank: int
    """Index on this node: the CUDA device this rank uses."""
    device: torch.device
    """Where this rank's model, data and collectives live (cuda:<local_rank>, or cpu with gloo)."""
    strategy: str
    """none | ddp | fsdp: what `apply_data_parallel` does (auto already resolved)."""


# -------------------------------------------------------------------------------------------------------- setup

def init_distributed(strategy: str, device: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), start the process group
    (nccl on CUDA, gloo on CPU) and resolve `strategy` (auto = none with one process, else ddp).

    `device`: train.device (auto | cpu | cuda). Without torchrun's variables this is a 1-process run: strategy
    none/auto gives DistInfo(0, 1, 0, device, "none") and no process group; ddp/fsdp is an error (it would silently
    train alone). Call `destroy_distributed` at the end.
    """
    if strategy not in STRATEGIES:
        raise DistributedError(f"dist.strategy: got {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    launched = "WORLD_SIZE" in os.environ
    if not launched:
        if strategy in ("ddp", "fsdp"):
            raise DistributedError(f"dist.strategy={strategy} needs the torchrun environment (RANK, WORLD_SIZE, "
                                   f"LOCAL_RANK); launch with `torchrun --nproc_per_node=<gpus> train.py ...`, or use "
                                   f"dist.strategy=none for one process")
        return DistInfo(0, 1, 0, _resolve_device(device, 0), "none")
    missing = [name for name in TORCHRUN_ENV if name not in os.environ]
    if missing:
        raise DistributedError(f"WORLD_SIZE is set but {', '.join(missing)} is not: launch with torchrun (it sets "
                               f"all of {', '.join(TORCHRUN_ENV)}), not by setting some of them by hand")
    rank, world_size, local_rank = (int(os.environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if strategy == "none" and world_size > 1:
        raise DistributedError(f"dist.strategy=none under torchrun with WORLD_SIZE={world_size}: every process would "
                               f"train its own model; use dist.strategy=ddp or fsdp (or auto)")
    resolved = ("ddp" if world_size > 1 else "none") if strategy == "auto" else strategy
    target = _resolve_device(device, local_rank)
    if resolved == "none":
        return DistInfo(rank, world_size, local_rank, target, "none")
    if target.type == "cuda":
        torch.cuda.set_device(target)
    backend = "nccl" if target.type == "cuda" else "gloo"
    if dist.is_initialized():
        if dist.get_world_size() != world_size or dist.get_rank() != rank:
            raise DistributedError(f"a process group is already initialized as rank {dist.get_rank()} of "
                                   f"{dist.get_world_size()}, but the environment says rank {rank} of {world_size}")
    else:
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s),
                                device_id=target if target.type == "cuda" else None)
    if is_main_rank(rank):
        log.info("distributed: %s over %d ranks (%s, %s)", resolved, world_size, backend, target)
    return DistInfo(rank, world_size, local_rank, target, resolved)


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name not in ("auto", "cpu", "cuda"):
        raise DistributedError(f"train.device: got {name!r}; expected auto, cpu or cuda")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DistributedError("train.device=cuda: no CUDA GPU is visible; use train.device=cpu (gloo) or auto")
    if local_rank >= torch.cuda.device_count():
        raise DistributedError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                               f"use --nproc_per_node <= {torch.cuda.device_count()}")
    return torch.device("cuda", local_rank)


def destroy_distributed() -> None:
    """Tear down the process group if one was started (safe to call in any run). The run's modules (DDP reducers,
    FSDP state) hold the groups through reference cycles; collected only at interpreter exit, they destroyed gloo's
    worker threads there and a rank aborted ("terminate called without an active exception", SIGABRT, seen in CI),
    so they are collected first, while the interpreter is whole."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def is_main(info: DistInfo) -> bool:
    """Rank 0: the one process that logs, writes metrics, samples, checkpoints and exports."""
    return is_main_rank(info.rank)


def is_main_rank(rank: int) -> bool:
    return rank == 0


def barrier(info: DistInfo) -> None:
    """Wait for every rank (a no-op in a 1-process run), e.g. while rank 0 writes files the others will read."""
    if info.world_size > 1 and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value, info: DistInfo | None = None) -> float:
    """The mean of a float (e.g. one optimizer step's loss) over all ranks, for logging; `value` itself in 1 process.
    Each rank's loss is the mean over its equally sized share, so the mean of means is the global batch's mean."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return float(value)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.as_tensor(value, dtype=torch.float64, device=device).detach().clone().reshape(())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor) / dist.get_world_size()


# ----------------------------------------------------------------------------------------------- data parallelism

def fsdp_mixed_precision(mixed_precision: bool) -> MixedPrecisionPolicy:
    """bf16 compute: FSDP2 all-gathers bf16 copies of the fp32 sharded master weights and reduce-scatters gradients in
    fp32 (accumulation without sync also stays fp32). fp32 runs (and the exactness tests) keep everything fp32."""
    if mixed_precision:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_data_parallel(model: nn.Module, info: DistInfo, mixed_precision: bool) -> nn.Module:
    """The module the loop runs forward + backward through, after every other seam (see the module docstring).

    none: `model` itself. ddp: a DistributedDataParallel wrapper around it (same Parameters; keep using `model` for
    the optimizer, EMA, checkpoints and sampling, so names carry no `module.` prefix). fsdp: FSDP2 `fully_shard` on
    each block of model.blocks, then on the root (patch embedding, conditioning, final layer), in place; the
    returned module is `model`, whose parameters are now DTensor shards of Shard(0) over the ranks.
    `mixed_precision` (train.precision != fp32): FSDP2's bf16 params / fp32 reduce policy. DDP needs nothing: the
    weights stay fp32, autocast (engine/precision.py) does the bf16 compute, gradients are reduced in fp32.
    """
    if info.strategy == "none":
        return model
    if info.strategy == "ddp":
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    if info.strategy == "fsdp":
        if not hasattr(model, "blocks"):
            raise DistributedError(f"dist.strategy=fsdp shards model.blocks one by one, but {type(model).__name__} "
                                   f"has no `blocks`")
        policy = fsdp_mixed_precision(mixed_precision)
        _shard(model, info, policy)
        return model
    raise DistributedError(f"dist.strategy: got {info.strategy!r}; expected none, ddp or fsdp (init_distributed "
                           f"resolves auto)")


def apply_data_parallel_to_ema(ema_model: nn.Module, info: DistInfo) -> nn.Module:
    """FSDP: shard the EMA copy exactly like the model (fp32, no compute policy), so EMA.update's
    `ema_param.lerp_(param)` pairs DTensor shards with the same placement and costs no communication, and the EMA
    memory is divided by the world size too. none/ddp: the EMA stays a plain replica (every rank updates it
    identically from the all-reduced weights)."""
    if info.strategy == "fsdp":
        _shard(ema_model, info, MixedPrecisionPolicy())
    return ema_model


def _shard(model: nn.Module, info: DistInfo, policy: MixedPrecisionPolicy) -> None:
    mesh = dist.device_mesh.init_device_mesh(info.device.type, (info.world_size,))
    for block in model.blocks:
        # Each block is one all-gather / reduce-scatter unit: only one block's full weights live at a time.
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    # The root holds what is left (patch embedding, conditioning MLPs, final layer); after the forward it keeps them
    # gathered for the backward that starts right away.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)


def amax_reduction_group(info: DistInfo):
    """The group FP8 amaxes are reduced over (TE's fp8_group): every rank, since DDP and FSDP here are pure data
    parallel, so each FP8 tensor is the same tensor of different samples and one scale must serve all ranks (it also
    keeps the ranks' FP8 weights, hence their updates, identical). None in a one-process run."""
    return dist.group.WORLD if info.world_size > 1 and dist.is_initialized() else None


def sync_context(model: nn.Module, is_last_micro_batch: bool):
    """The context one micro-batch's forward + backward runs in.

    DDP all-reduces (FSDP reduce-scatters) gradients during backward. With gradient accumulation only the last
    micro-batch of an optimizer step needs that: the earlier ones would communicate partial sums that the next
    backward overwrites, grad_accum times the traffic for nothing. nanoGPT sets `model.require_backward_grad_sync`
    only on the last micro-step for this reason; here DDP's `no_sync()` and FSDP2's
    `set_requires_gradient_sync(False)` do the same (DDP keeps the local sums in .grad, FSDP2 keeps the unsharded
    gradients in fp32 until the last backward reduces them; that costs one full gradient of memory per rank).
    A plain module has nothing to skip.
    """
    if isinstance(model, DistributedDataParallel):
        return nullcontext() if is_last_micro_batch else model.no_sync()
    if isinstance(model, FSDPModule):
        return _fsdp_gradient_sync(model, is_last_micro_batch)
    return nullcontext()


@contextmanager
def _fsdp_gradient_sync(model: FSDPModule, enabled: bool):
    model.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)  # the default, whatever runs the model next (e.g. sampling)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under a DDP wrapper (FSDP2 shards in place: nothing to unwrap)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


# --------------------------------------------------------------------------------- global batch and sample index
#
# One optimizer step consumes G = b * A * N samples (per-rank batch b, grad_accum A, world size N). The 1-process run
# with the same G (batch b*N, or b with grad_accum A*N: the accumulation anchor makes them equal) gives step s the
# samples with global indices s*G .. s*G + G - 1, sample g being item order[g] of the seeded epoch order, with noise,
# timestep and caption dropout keyed by g. With N ranks, rank r's micro-batch m of step s is the contiguous block
#
#     g = s*G + (m*N + r)*b + row,   row = 0 .. b-1
#
# so (a) over all m, r, row the step covers exactly s*G .. s*G + G - 1 (the same samples as the 1-process step),
# (b) each micro-batch's indices are contiguous, which is what train.py's draw_timesteps_and_noise(first_index)
# and caption_dropout_mask(first_index) expect, and (c) ResumableSampler(block=b) hands rank r exactly the items
# order[g] of those indices. Together: every sample sees the same data, noise, timestep and dropout as in the 1-process run, the
# gradient is the mean over the same G samples, and the parameters agree up to float summation order.

def global_batch_size(batch_size: int, grad_accum: int, info: DistInfo) -> int:
    """Samples per optimizer step over all ranks: per-rank batch x grad_accum x world_size."""
    return batch_size * grad_accum * info.world_size


def global_sample_index(step: int, micro: int, rank: int, row: int, batch_size: int, grad_accum: int,
                        world_size: int) -> int:
    """The run-wide index of row `row` of micro-batch `micro` on rank `rank` in optimizer step `step`
    (0-based; see the comment above): the key of that sample's randomness and its place in the data order."""
    return (step * grad_accum * world_size + micro * world_size + rank) * batch_size + row


def first_sample_index(samples_seen: int, micro: int, info: DistInfo, batch_size: int) -> int:
    """Index of row 0 of this rank's micro-batch `micro`, when `samples_seen` (all ranks) were consumed before the
    step: what train.py passes as `first_index` to caption_dropout_mask and micro_step_loss."""
    return samples_seen + (micro * info.world_size + info.rank) * batch_size


def global_data_state(loader_state: dict, info: DistInfo) -> dict:
    """A rank's loader/sampler state (epoch, its own position) as run-wide samples consumed in the epoch: the
    single-process format, which any world size can resume from. Exact at optimizer-step boundaries."""
    return {"epoch": int(loader_state["epoch"]), "position": int(loader_state["position"]) * info.world_size}


def local_data_state(data_state: dict, info: DistInfo) -> dict:
    """Inverse of `global_data_state` for this run's world size; a position that does not split evenly is an error
    (the global batch of the resumed run must divide the samples consumed in the epoch)."""
    position = int(data_state["position"])
    if position % info.world_size:
        raise DistributedError(f"checkpoint data position {position} does not split over {info.world_size} ranks; "
                               f"resume with a world size that divides it")
    return {"epoch": int(data_state["epoch"]), "position": position // info.world_size}


# ------------------------------------------------------------------------------------------------- checkpoints

def full_state_options() -> StateDictOptions:
    """Gather full (unsharded) tensors; with cpu_offload only rank 0 receives them (others get {}), in CPU memory."""
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def gather_full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The plain state dict of `module` (sharded, DDP-wrapped or plain) gathered on rank 0 as contiguous CPU tensors in
    the single-process key format (weights.plain_state: no `module.` prefix, no TE `_extra_state`); {} on other ranks.
    A collective under FSDP: every rank must call it."""
    state = get_model_state_dict(module, options=full_state_options())
    return {key: plain_tensor(value).detach().contiguous().cpu() for key, value in state.items()
            if not key.endswith(EXTRA_STATE_SUFFIX)}


def plain_module_on_main(module: nn.Module, make_plain, info: DistInfo) -> nn.Module | None:
    """A module rank 0 can run alone (validation sampling, export): `module` itself for none/ddp (pass the unwrapped
    model or the EMA copy), and for fsdp a fresh `make_plain()` model (e.g. build_plain_model(config), moved to
    info.device) loaded with the gathered weights; None on the other ranks. Collective under FSDP: every rank calls
    it, then rank 0 samples while the others wait at `barrier`."""
    if info.strategy != "fsdp":
        return module if is_main(info) else None
    state = gather_full_state(module)
    if not is_main(info):
        return None
    plain = make_plain().to(info.device)
    plain.load_state_dict(state)
    return plain


def export_weights(out_dir: Path, model: nn.Module, ema_model: nn.Module | None, info: DistInfo) -> None:
    """The run's final weights for any strategy: rank 0 writes out_dir/model.safetensors (+ ema.safetensors), plain
    keys, each under a temporary name then renamed. Every rank calls it (the gather is collective under FSDP)."""
    targets = {"model": model} | ({"ema": ema_model} if ema_model is not None else {})
    states = {name: gather_full_state(module) for name, module in targets.items()}
    if is_main(info):
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, state in states.items():
            tmp = out_dir / f".{name}.safetensors.tmp"
            save_file(state, str(tmp))
            tmp.replace(out_dir / f"{name}.safetensors")
    barrier(info)


def save_distributed(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict,
                     ema_model: nn.Module | None = None, info: DistInfo | None = None) -> Path:
    """Write a checkpoint folder `path` in engine/checkpoint.py's layout, from any strategy, on rank 0:
        model.safetensors, ema.safetensors (plain full weights: the export), state.pt (`extra` + "optimizer", the
        FQN-keyed full optimizer state of get_optimizer_state_dict), manifest.json (sha256 of each file, last).
    Every rank must call it (the gather is collective). `extra`: plain containers and tensors only (scheduler, train
    state, data position in global form, RNG), loadable with torch.load(weights_only=True). Written under a
    temporary name, fsync'd, renamed; the other ranks wait at a barrier until the folder is published.
    """
    path = Path(path)
    info = info or _current_info()
    model_state = gather_full_state(model)
    ema_state = gather_full_state(ema_model) if ema_model is not None else None
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=full_state_options())
    if is_main(info):
        if "optimizer" in extra:
            raise ValueError("save_distributed: `extra` may not use the key 'optimizer' (it holds the optimizer state)")
        weights = {"model": model_state} | ({"ema": ema_state} if ema_state is not None else {})
        # FP8 scales are the same on every rank (amax_reduction_group), so rank 0's are the run's.
        weights |= {FP8_STATE: fp8} if (fp8 := fp8_scaling_state(unwrap(model))) else {}
        training_state = {**extra, "optimizer": optimizer_state, "world_size": info.world_size}
        write_checkpoint_folder(path, int(extra.get("step", -1)), weights, training_state)
    barrier(info)
    return path


def load_distributed(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                     ema_model: nn.Module | None = None, info: DistInfo | None = None) -> dict:
    """Load a `save_distributed` checkpoint written by any number of ranks into this run's (sharded, wrapped or plain)
    model, optimizer and EMA; returns `extra` (state.pt without the optimizer) on every rank.

    Rank 0 verifies the checksums and reads the files (safetensors; torch.load weights_only=True: nothing is
    unpickled); set_model_state_dict / set_optimizer_state_dict with broadcast_from_rank0 send each tensor to the
    other ranks, which keep only their shard. Every rank must call it.
    """
    path = Path(path)
    info = info or _current_info()
    spread = info.world_size > 1 and dist.is_initialized()
    model_state, ema_state, saved = {}, {}, {}
    if is_main(info):
        verify_checkpoint(path)
        model_state = load_file(str(path / "model.safetensors"))
        saved = torch.load(path / STATE, map_location="cpu", weights_only=True)
        if ema_model is not None:
            if not (path / "ema.safetensors").is_file():
                raise CheckpointError(f"checkpoint {path}: the run keeps an EMA but the checkpoint has no "
                                      f"ema.safetensors")
            ema_state = load_file(str(path / "ema.safetensors"))
        if (path / f"{FP8_STATE}.safetensors").is_file():
            saved[FP8_STATE] = load_file(str(path / f"{FP8_STATE}.safetensors"))
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=spread, strict=False)
    _set_model(model, model_state, options, path)
    if ema_model is not None:
        _set_model(ema_model, ema_state, options, path)
    set_optimizer_state_dict(model, optimizer, saved.get("optimizer", {}), options=options)
    extra = {key: value for key, value in saved.items() if key != "optimizer"}
    if spread:
        box = [extra]
        dist.broadcast_object_list(box, src=0)  # rank 0's already-verified plain values, between our own processes
        extra = box[0]
    return extra


def _set_model(module: nn.Module, state: dict, options: StateDictOptions, path: Path) -> None:
    with ignoring_te_extra_state(module):  # TE's FP8 state is restored from fp8_state.safetensors (train.resume_from)
        result = set_model_state_dict(module, state, options=options)
    missing = [key for key in result.missing_keys if not key.endswith(EXTRA_STATE_SUFFIX)]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"checkpoint {path} does not match the model: missing {missing[:5]}, unexpected "
                              f"{list(result.unexpected_keys)[:5]}")


def _current_info() -> DistInfo:
    """Rank and world size of the running process group (or a 1-process run), for callers without a DistInfo."""
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                        torch.device("cpu"), "ddp")
    return DistInfo(0, 1, 0, torch.device("cpu"), "none")
