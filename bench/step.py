"""Training-step throughput of the real loop: engine/train.train_step, timed for our Latte and diffusers' twin.

    python -m ristretto.bench.step [--out DIR] [--configs xl2-t2v,t2v512] [--variants eager,compile,...]
        [--checkpointing none,full] [--attention sdpa|...] [--batch N] [--steps N] [--smoke]

What is timed is the function the training loop calls, `engine.train.train_step`: every micro-step's device-side
noise / timesteps / caption dropout, forward under the precision's autocast, the real diffusion loss (the learned-
sigma variational bound included where the preset learns sigma), backward, gradient clipping, the one host read of
(loss, grad norm), AdamW (fused on CUDA), the LR schedule and the EMA. Batches come like data.kind=cached's: latents
and caption embeddings, pinned on CUDA as the loader pins them, copied with non_blocking. Nothing is re-implemented
here, so the MFU reported is the loop's, not a model-only step's.

Variants (rows): ours `eager`, `compile` (each block compiled, dynamic=False), `triton` (model.kernels=triton),
`triton+compile`, `fp8-ao+compile` (torchao float8 training), and diffusers' LatteTransformer3DModel `diffusers`
(eager) and `diffusers+compile` (each of its blocks compiled the same way). diffusers runs through the same
train_step behind an adapter that takes our call signature; its attention is its default processor (torch SDPA),
checkpointing its own enable_gradient_checkpointing().

Configs (GPU): `xl2-t2v` the text-to-video structure at Latte-XL/2's size (1152 wide, 14 layers, T5 captions) at
16x256^2, batch 4; `t2v512` Latte-1 16x512^2, batch 2; `xl2` the class-conditional Latte-XL/2 (ours only). Without
CUDA: a tiny smoke config (fp32) that runs the same code in seconds; its numbers say nothing about speed.

Reported per row: ms/step (wall time of --steps consecutive train_step calls / steps, after warm-up, synchronised at
both ends: the loop's steady state, host overheads included), samples/s, tokens/s, peak memory, model TFLOP/s and
MFU = engine/flops.py model FLOPs per step (3x the forward matmuls, recomputation not counted) / time / the device's
dense bf16 peak, the speed-up over diffusers eager taken in the same run, and (CUDA) host syncs per step counted with
torch.cuda's sync debug mode (the loop's target: 1, its NaN-guard read).
"""
import argparse
import contextlib
import gc
import itertools
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ristretto.bench.attention import bf16_peak_tflops
from ristretto.bench.common import RESULTS_DIR, format_table, write_report
from ristretto.engine import train as train_module
from ristretto.engine.build import build_training_model, latent_geometry
from ristretto.engine.config import build_config
from ristretto.engine.diffusion import Diffusion
from ristretto.engine.distributed import DistInfo
from ristretto.engine.ema import EMA
from ristretto.engine.flops import model_flops
from ristretto.engine.precision import Precision
from ristretto.engine.progress import progress_bar
from ristretto.engine.train import Encoders, TrainState, build_optimizer
from ristretto.model.diffusers_interop import diffusers_config

WARMUP_STEPS = 3  # compile, autotuning and the allocator settle in these
BENCH_OVERRIDES = ("data.kind=cached",)  # latents and caption embeddings are given, as with the latent cache


@dataclass(frozen=True)
class StepConfig:
    label: str
    preset: str
    overrides: tuple[str, ...] = ()
    with_diffusers: bool = True  # a diffusers twin exists (text-to-video only)


CONFIGS = {
    "xl2": StepConfig("latte-xl2 16x256 class", "latte-xl2-ucf", (), with_diffusers=False),
    "xl2-t2v": StepConfig("latte-xl2 16x256 t2v", "latte-t2v-512", ("data.resolution=256", "model.depth=14",
                                                                      "train.batch_size=4")),
    "t2v512": StepConfig("latte-1 16x512 t2v", "latte-t2v-512", ("train.batch_size=2",)),
}
DEFAULT_CONFIGS = ("xl2-t2v", "t2v512")
SMOKE_CONFIG = StepConfig("tiny-t2v 4x16 smoke", "tiny-t2v", ("train.batch_size=2", "data.frames=4",
                                                            "data.resolution=16", "model.caption_length=8",
                                                            "model.learn_sigma=true"))


@dataclass(frozen=True)
class Variant:
    """One row's implementation and seams."""
    impl: str  # ours | diffusers
    kernels: str = "torch"
    compile: bool = False
    precision: str | None = None  # None: the run's --precision
    needs_cuda: bool = False


VARIANTS = {
    "eager": Variant("ours"),
    "compile": Variant("ours", compile=True),
    "triton": Variant("ours", kernels="triton", needs_cuda=True),
    "triton+compile": Variant("ours", kernels="triton", compile=True, needs_cuda=True),
    "fp8-ao+compile": Variant("ours", compile=True, precision="fp8-ao", needs_cuda=True),
    "diffusers": Variant("diffusers"),
    "diffusers+compile": Variant("diffusers", compile=True),
}
SMOKE_VARIANTS = ("eager", "diffusers")  # compile on 2 shared CPU cores takes minutes; the GPU runs them all


def selected_variants(args, smoke: bool) -> dict[str, Variant]:
    """--variants by name; else --kernels / --compile / --precision fp8-* pick one variant of ours plus diffusers'
    matching one; else all variants on a GPU and SMOKE_VARIANTS on CPU."""
    if args.variants:
        return {name: VARIANTS[name] for name in args.variants}
    fp8 = args.precision if args.precision.startswith("fp8") else None
    if args.kernels is None and not args.compile and fp8 is None:
        return {name: VARIANTS[name] for name in (SMOKE_VARIANTS if smoke else VARIANTS)}
    kernels = args.kernels or "torch"
    parts = [part for part in ("triton" if kernels == "triton" else "", fp8 or "", "compile" if args.compile else "")
             if part]
    ours = Variant("ours", kernels=kernels, compile=args.compile, precision=fp8,
                   needs_cuda=kernels == "triton" or fp8 is not None)
    return {"+".join(parts) or "eager": ours,
            "diffusers+compile" if args.compile else "diffusers": VARIANTS["diffusers+compile" if args.compile
                                                                            else "diffusers"]}


# ------------------------------------------------------------------------------------------------------ inputs

def random_inputs(config, batch: int, device, seed: int = 0):
    """(latents [B, F, C, H, W], timesteps [B], conditions) like a cached-latent batch: captions padded with a mask."""
    generator = torch.Generator().manual_seed(seed)
    channels, size = latent_geometry(config)
    latents = torch.randn(batch, config.data.frames + config.data.num_images, channels, size, size, generator=generator)
    timesteps = torch.randint(0, config.diffusion.num_train_timesteps, (batch,), generator=generator)
    if config.model.kind == "class":
        conditions = {"label": torch.randint(0, config.model.num_classes, (batch,), generator=generator)}
    else:
        length = config.model.caption_length
        kept = torch.randint(1, length + 1, (batch, 1), generator=generator)
        conditions = {"caption": torch.randn(batch, length, config.model.caption_channels, generator=generator),
                      "caption_mask": torch.arange(length)[None] < kept}
        if config.data.num_images:
            conditions["image_caption"] = torch.randn(batch, config.data.num_images, length,
                                                      config.model.caption_channels, generator=generator)
            conditions["image_caption_mask"] = torch.ones(batch, config.data.num_images, length, dtype=torch.bool)
    return latents.to(device), timesteps.to(device), {k: v.to(device) for k, v in conditions.items()}


def cached_batches(config, batch: int, device, distinct: int = 2):
    """An endless iterator of host batches shaped like data.kind=cached's (engine/datasets.py), pinned on CUDA as the
    loader pins them: what train_step pulls from the DataLoader in a cached-latent run."""
    batches = []
    for seed in range(distinct):
        latents, _, conditions = random_inputs(config, batch, "cpu", seed)
        item = {"latents": latents}
        if config.model.kind == "class":
            item["label"] = conditions["label"]
        else:
            item |= {"caption_embeds": conditions["caption"], "caption_mask": conditions["caption_mask"]}
            if "image_caption" in conditions:
                item |= {"image_caption_embeds": conditions["image_caption"],
                         "image_caption_mask": conditions["image_caption_mask"]}
        if torch.device(device).type == "cuda":
            item = {key: value.pin_memory() for key, value in item.items()}
        batches.append(item)
    return itertools.cycle(batches)


def null_caption(config, device):
    """A fixed (embeddings [L, D], mask [L]) standing in for the cache's encoded empty caption."""
    if config.model.kind != "t2v":
        return None
    length = config.model.caption_length
    embeddings = torch.randn(length, config.model.caption_channels, generator=torch.Generator().manual_seed(1))
    return embeddings.to(device), (torch.arange(length) < 1).to(device)


def bench_config(step_config: StepConfig, args, precision: str, checkpointing: str, variant: Variant = VARIANTS["eager"]):
    """The RunConfig of one row: the preset, the bench's fixed overrides, the command line's, then the variant's."""
    overrides = [*BENCH_OVERRIDES, *step_config.overrides, f"train.precision={variant.precision or precision}",
                 f"train.checkpointing={checkpointing}", f"model.kernels={variant.kernels}",
                 f"model.attention_backend={args.attention}", f"train.compile={variant.compile}"]
    if args.batch:
        overrides.append(f"train.batch_size={args.batch}")
    return build_config(step_config.preset, overrides)


# ------------------------------------------------------------------------------------------------- the models

class DiffusersAsLatte(nn.Module):
    """diffusers' LatteTransformer3DModel behind our model's call: model(x [B, F, C, H, W], t, caption=..., ...)."""

    def __init__(self, config):
        super().__init__()
        from diffusers import LatteTransformer3DModel  # noqa: PLC0415 - only the comparison needs diffusers

        _, sample_size = latent_geometry(config)
        self.frames = config.data.frames
        self.transformer = LatteTransformer3DModel(**diffusers_config(config.model, config.data.frames, sample_size))

    def forward(self, latents, timesteps, num_images=0, caption=None, caption_mask=None):
        # diffusers hands encoder_attention_mask to its spatial blocks as given: an additive bias [B*F, 1, L]
        bias = (1.0 - caption_mask.float()) * -10000.0
        out = self.transformer(latents.permute(0, 2, 1, 3, 4), timesteps, encoder_hidden_states=caption,
                               encoder_attention_mask=bias.repeat_interleave(self.frames, dim=0)[:, None, :]).sample
        return out.permute(0, 2, 1, 3, 4)  # (B, C, F, H, W) -> (B, F, C, H, W)


def diffusers_training_model(config, device):
    """(model, ema, precision) for diffusers' twin, set up as build_training_model sets up ours."""
    model = DiffusersAsLatte(config).to(device)
    train = config.train
    ema = EMA(model, train.ema_decay, train.ema_warmup, every=train.ema_every) if train.ema_decay > 0 else None
    if train.checkpointing != "none":
        model.transformer.enable_gradient_checkpointing()
    if train.compile:
        for block in [*model.transformer.transformer_blocks, *model.transformer.temporal_transformer_blocks]:
            block.compile(dynamic=False)
    return model, ema, Precision(train.precision, torch.device(device).type)


@dataclass
class StepRig:
    """Everything engine/train.train_on_ranks builds for a step, one process, cached-latent batches."""
    config: object
    device: torch.device
    model: nn.Module
    ema: EMA | None
    optimizer: torch.optim.Optimizer
    scheduler: object
    diffusion: Diffusion
    precision: object
    encoders: Encoders
    batches: object
    state: TrainState
    info: DistInfo

    @classmethod
    def build(cls, config, device, implementation: str = "ours") -> "StepRig":
        device = torch.device(device)
        build = build_training_model if implementation == "ours" else diffusers_training_model
        model, ema, precision = build(config, device)
        optimizer, scheduler = build_optimizer(model, config.train)
        encoders = Encoders(vae=None, text_encoder=None, null_caption=null_caption(config, device))
        return cls(config, device, model, ema, optimizer, scheduler, Diffusion(config.diffusion), precision, encoders,
                   cached_batches(config, config.train.batch_size, device), TrainState(),
                   DistInfo(0, 1, 0, device, "none"))

    def step(self):
        """One optimizer step of the training loop (engine/train.train_step), then the loop's bookkeeping."""
        result = train_module.train_step(self.model, self.model, self.optimizer, self.scheduler, self.ema,
                                         self.batches, self.encoders, self.diffusion, self.precision, self.state,
                                         self.config, self.device, self.info)
        self.state.samples_seen += self.config.train.batch_size * self.config.train.grad_accum
        self.state.step += int(result.stepped)
        return result


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(rig: StepRig, steps: int, warmup: int = WARMUP_STEPS) -> float:
    """Seconds per step over `steps` consecutive steps after `warmup`, synchronised at both ends only."""
    for _ in range(warmup):
        rig.step()
    synchronize(rig.device)
    start = time.perf_counter()
    for _ in range(steps):
        rig.step()
    synchronize(rig.device)
    return (time.perf_counter() - start) / steps


def host_syncs_per_step(rig: StepRig, steps: int = 2) -> float:
    """Synchronising CUDA calls per step, counted by torch.cuda's sync debug mode over `steps` steps: the warnings of
    every sync other than the step's one deliberate read (engine/train.deliberate_sync), plus that one."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                rig.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = sum("synchronizing" in str(warning.message) for warning in caught)
    return syncs / steps + 1


@contextlib.contextmanager
def cpu_threads(count: int):
    """Run with `count` intra-op threads, then restore: at smoke sizes thread hand-offs cost more than the math, and
    on shared cores a spinning second thread can make a 10 ms step take seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def free_memory(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_one(variant_name: str, variant: Variant, config, device, steps: int, peak_tflops: float | None,
              warmup: int) -> dict:
    """A row: timings, throughput, peak memory and MFU of one variant, or a note saying why it did not run."""
    row = {"variant": variant_name}
    if variant.needs_cuda and device.type != "cuda":
        return {**row, "note": "needs CUDA"}
    batch = config.train.batch_size
    free_memory(device)  # the previous row's model, or an out-of-memory traceback's frames
    rig = None
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rig = StepRig.build(config, device, variant.impl)
        seconds = time_steps(rig, steps, warmup)
        loss = rig.step().loss
        if device.type == "cuda":
            row["host syncs/step"] = host_syncs_per_step(rig)
    except (torch.OutOfMemoryError, RuntimeError, ValueError, ImportError, AssertionError) as error:
        del rig
        free_memory(device)
        return {**row, "note": f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"}
    if device.type == "cuda":
        row["peak GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    del rig
    free_memory(device)
    tokens_per_frame = (latent_geometry(config)[1] // config.model.patch_size) ** 2
    tokens = (config.data.frames + config.data.num_images) * tokens_per_frame
    tflops = model_flops(config, batch).training / seconds / 1e12
    row.update({"ms/step": seconds * 1e3, "samples/s": batch / seconds, "tokens/s": batch * tokens / seconds,
                "TFLOP/s": tflops, "loss": loss})
    if peak_tflops:
        row["MFU %"] = 100.0 * tflops / peak_tflops
    return row


# ------------------------------------------------------------------------------------------------------ the run

def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    smoke = args.smoke or device.type != "cuda"
    step_configs = [SMOKE_CONFIG] if smoke else [CONFIGS[name] for name in args.configs]
    variants = selected_variants(args, smoke)
    # bf16 autocast on CPU measures nothing useful (and is slow); the CPU smoke checks the plumbing in fp32
    precision = "fp32" if device.type != "cuda" or args.precision == "fp32" else "bf16"
    peak_tflops = bf16_peak_tflops(device)
    warmup = WARMUP_STEPS if device.type == "cuda" else 1
    rows = []
    for step_config in progress_bar(step_configs, desc="train step", unit="config"):
        for mode in args.checkpointing:
            base_config = bench_config(step_config, args, precision, mode)
            base = {"config": step_config.label, "checkpointing": mode, "batch": base_config.train.batch_size}
            found = []
            for name, variant in variants.items():
                if variant.impl == "diffusers" and not step_config.with_diffusers:
                    continue
                config = bench_config(step_config, args, precision, mode, variant)
                found.append({**base, **bench_one(name, variant, config, device, args.steps, peak_tflops, warmup)})
            reference = next((r for r in found if r["variant"] == "diffusers" and "ms/step" in r), None)
            for row in found:
                if reference is not None and "ms/step" in row:
                    row["speedup vs diffusers"] = reference["ms/step"] / row["ms/step"]
            rows.extend(found)
    print(format_table(rows))
    payload = {"config": {"smoke": smoke, "precision": precision, "attention": args.attention, "steps": args.steps,
                          "warmup_steps": warmup, "bf16_peak_tflops": peak_tflops, "variants": list(variants),
                          "timed": "engine.train.train_step (micro-steps, loss, backward, clip, AdamW, EMA)",
                          "timer": "wall clock over consecutive steps, synchronised at both ends",
                          "configs": [c.__dict__ for c in step_configs]},
               "rows": rows}
    if rows:  # on a CPU too, to runs/bench/ unless --out: its JSON says "smoke": true (no GPU speed in it)
        labels = list(dict.fromkeys(f"{r['config']} {r['checkpointing']}" for r in rows))
        series = {name: [next((r.get("samples/s", 0.0) for r in rows if r["variant"] == name
                               and f"{r['config']} {r['checkpointing']}" == label), 0.0) for label in labels]
                  for name in dict.fromkeys(r["variant"] for r in rows)}
        write_report("step", payload, args.out, labels, series, "samples/s", "train step (engine.train.train_step)")
    return payload


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help=f"results folder (default {RESULTS_DIR} on a GPU)")
    parser.add_argument("--configs", type=lambda s: s.split(","), default=list(DEFAULT_CONFIGS),
                        help=f"comma-separated, from {', '.join(CONFIGS)}")
    parser.add_argument("--variants", type=lambda s: s.split(","), default=None,
                        help=f"comma-separated, from {', '.join(VARIANTS)} (default: all on a GPU, "
                             f"{','.join(SMOKE_VARIANTS)} in the CPU smoke)")
    parser.add_argument("--checkpointing", type=lambda s: s.split(","), default=["none"],
                        help="comma-separated train.checkpointing modes (diffusers: any mode but none = its own)")
    parser.add_argument("--attention", default="sdpa", help="model.attention_backend for our model")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp8-ao", "fp8-te"],
                        help="the runs' precision (bf16 on a GPU, fp32 on CPU); fp8-* selects one FP8 variant of ours")
    parser.add_argument("--kernels", default=None, choices=["torch", "triton"],
                        help="without --variants: only our variant with these kernels (+ diffusers)")
    parser.add_argument("--compile", action="store_true",
                        help="without --variants: only the compiled variants (ours as chosen, diffusers+compile)")
    parser.add_argument("--batch", type=int, default=0, help="micro-batch (default: per config)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps after the warm-up")
    parser.add_argument("--smoke", action="store_true", help="the tiny CPU config (always on without a GPU)")
    args = parser.parse_args(argv)
    for option, names, known in (("--configs", args.configs, CONFIGS), ("--variants", args.variants or [], VARIANTS)):
        unknown = [name for name in names if name not in known]
        if unknown:
            parser.error(f"{option}: unknown {unknown}; expected names from {', '.join(known)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if torch.cuda.is_available() and not args.smoke:
        return run(args)
    args.steps = min(args.steps, 3)
    with cpu_threads(1):
        return run(args)


if __name__ == "__main__":
    main()
