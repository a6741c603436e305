"""One training step (forward + backward + AdamW step) of our Latte vs diffusers' LatteTransformer3DModel.

    python -m ristretto.bench.step [--out DIR] [--configs xl2,xl2-t2v,t2v512] [--checkpointing none,full]
        [--kernels torch|triton] [--attention sdpa|...] [--precision bf16|fp32|fp8-ao|fp8-te] [--batch N] [--compile]
        [--steps N] [--smoke]

Both models get the same config (model/diffusers_interop.diffusers_config), batch, inputs, loss (MSE on the first C
output channels), optimizer (engine/train.build_optimizer: AdamW) and precision (bf16 autocast, fp32 master weights).
Ours is built by engine/build.build_training_model, so --kernels/--attention/--precision/--checkpointing/--compile go
through the same seams as training; diffusers keeps its default attention processor (torch SDPA), checkpointing is
its model.enable_gradient_checkpointing(), --compile compiles each of its blocks as we compile ours, and it has no
FP8 converter or Triton kernels, so for fp8 only our rows run. No EMA and no encoders (latents are given).

Configs (GPU): `xl2` Latte-XL/2 16x256^2, class-conditional (ours only: diffusers has no class-conditional Latte);
`xl2-t2v` the text-to-video structure at Latte-XL/2's size (1152 wide, 14 layers, T5 captions) for the diffusers
comparison at 16x256^2; `t2v512` Latte-1 16x512^2 (text-to-video, both). Without CUDA: a tiny smoke config (fp32,
wall clock) that checks the plumbing in seconds.

Reported per row: ms/step (median over --steps after 2 warm-up steps, CUDA-synchronised wall clock), samples/s,
tokens/s (tokens = frames x (H/p)(W/p)), peak memory (torch.cuda.max_memory_allocated), model TFLOP/s and MFU =
model FLOPs per step (engine/flops.py: 3x the forward matmuls, recomputation not counted) / time / device bf16 dense
peak, and ours/diffusers speed ratios taken in the same run. Writes a table, JSON (step_<device>.json) and a chart.
"""
import argparse
import contextlib
import gc
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ristretto.bench.attention import bf16_peak_tflops
from ristretto.bench.common import RESULTS_DIR, format_table, write_report
from ristretto.engine.build import build_training_model, latent_geometry
from ristretto.engine.config import build_config
from ristretto.engine.flops import model_flops
from ristretto.engine.progress import progress_bar
from ristretto.engine.train import build_optimizer
from ristretto.model.diffusers_interop import diffusers_config

WARMUP_STEPS = 2
BENCH_OVERRIDES = ("data.kind=cached", "train.ema_decay=0")  # latents are given; a step is fwd+bwd+AdamW only


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
SMOKE_CONFIG = StepConfig("tiny-t2v 4x16 smoke", "tiny-t2v", ("train.batch_size=2", "data.frames=4",
                                                            "data.resolution=16", "model.caption_length=8"))


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


def bench_config(step_config: StepConfig, args, precision: str, checkpointing: str):
    """The RunConfig of one row: the preset, the bench's fixed overrides, then the command line's choices."""
    overrides = [*BENCH_OVERRIDES, *step_config.overrides, f"train.precision={precision}",
                 f"train.checkpointing={checkpointing}", f"model.kernels={args.kernels}",
                 f"model.attention_backend={args.attention}", f"train.compile={args.compile}"]
    if args.batch:
        overrides.append(f"train.batch_size={args.batch}")
    return build_config(step_config.preset, overrides)


# ------------------------------------------------------------------------------------------------- the models

def ours(config, device):
    """(model, forward(x, t, conditions) -> [B, F, C_out, H, W], autocast) with every seam applied."""
    model, _, precision = build_training_model(config, device)

    def forward(latents, timesteps, conditions):
        return model(latents, timesteps, num_images=config.data.num_images, **conditions)

    return model, forward, precision.autocast


def diffusers_twin(config, device):
    """diffusers' LatteTransformer3DModel with the same config; checkpointing and compile its own way."""
    from diffusers import LatteTransformer3DModel  # noqa: PLC0415 - only the comparison needs diffusers

    _, sample_size = latent_geometry(config)
    model = LatteTransformer3DModel(**diffusers_config(config.model, config.data.frames, sample_size)).to(device)
    if config.train.checkpointing != "none":
        model.enable_gradient_checkpointing()
    if config.train.compile:
        for block in [*model.transformer_blocks, *model.temporal_transformer_blocks]:
            block.compile()
    frames = config.data.frames

    def forward(latents, timesteps, conditions):
        # diffusers hands encoder_attention_mask to its spatial blocks as given: an additive bias [B*F, 1, L]
        bias = (1.0 - conditions["caption_mask"].float()) * -10000.0
        out = model(latents.permute(0, 2, 1, 3, 4), timesteps, encoder_hidden_states=conditions["caption"],
                    encoder_attention_mask=bias.repeat_interleave(frames, dim=0)[:, None, :]).sample
        return out.permute(0, 2, 1, 3, 4)  # (B, C, F, H, W) -> (B, F, C, H, W)

    def autocast():
        if config.train.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    return model, forward, autocast


def make_step(model, forward, autocast, config, inputs):
    """One optimizer step: forward under autocast, MSE on the first C channels, backward, AdamW, zero grads."""
    optimizer, _ = build_optimizer(model, config.train)
    latents, timesteps, conditions = inputs
    channels = latents.shape[2]
    noise = torch.randn_like(latents)

    def step():
        with autocast():
            output = forward(latents, timesteps, conditions)
        loss = (output[:, :, :channels].float() - noise).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def time_step(step, device, steps: int, warmup: int = WARMUP_STEPS) -> float:
    """Median seconds per step after `warmup` steps, synchronising CUDA around each step."""
    for _ in range(warmup):
        step()
    samples = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


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


def bench_one(implementation: str, config, device, steps: int, peak_tflops: float | None) -> dict:
    """A row: timings, throughput, peak memory and MFU of one implementation, or a note saying why it did not run."""
    row = {"impl": implementation}
    build = ours if implementation == "ours" else diffusers_twin
    batch = config.train.batch_size
    free_memory(device)  # the previous row's model, or an out-of-memory traceback's frames
    try:
        inputs = random_inputs(config, batch, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        model, forward, autocast = build(config, device)
        warmup = WARMUP_STEPS if device.type == "cuda" else 1  # the CPU smoke checks plumbing, not speed
        seconds = time_step(make_step(model, forward, autocast, config, inputs), device, steps, warmup)
    except (torch.OutOfMemoryError, RuntimeError, ValueError, ImportError) as error:
        free_memory(device)
        return {**row, "note": str(error).splitlines()[0][:160]}
    if device.type == "cuda":
        row["peak GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    del model, forward
    free_memory(device)
    tokens_per_frame = (latent_geometry(config)[1] // config.model.patch_size) ** 2
    tokens = (config.data.frames + config.data.num_images) * tokens_per_frame
    tflops = model_flops(config, batch).training / seconds / 1e12
    row.update({"ms/step": seconds * 1e3, "samples/s": batch / seconds, "tokens/s": batch * tokens / seconds,
                "TFLOP/s": tflops})
    if peak_tflops:
        row["MFU %"] = 100.0 * tflops / peak_tflops
    return row


# ------------------------------------------------------------------------------------------------------ the run

def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = args.smoke or device.type != "cuda"
    step_configs = [SMOKE_CONFIG] if smoke else [CONFIGS[name] for name in args.configs]
    # bf16 autocast on CPU measures nothing useful (and is slow); the CPU smoke checks the plumbing in fp32
    precision = "fp32" if device.type != "cuda" and args.precision == "bf16" else args.precision
    peak_tflops = bf16_peak_tflops(device)
    rows = []
    for step_config in progress_bar(step_configs, desc="train step", unit="config"):
        for mode in args.checkpointing:
            config = bench_config(step_config, args, precision, mode)
            implementations = ["ours"]
            if step_config.with_diffusers and precision in ("bf16", "fp32"):
                implementations.append("diffusers")
            base = {"config": step_config.label, "checkpointing": mode, "batch": config.train.batch_size}
            found = [{**base, **bench_one(name, config, device, args.steps, peak_tflops)} for name in implementations]
            if len(found) == 2 and "ms/step" in found[0] and "ms/step" in found[1]:
                found[0]["speedup vs diffusers"] = found[1]["ms/step"] / found[0]["ms/step"]
            rows.extend(found)
    print(format_table(rows))
    payload = {"config": {"smoke": smoke, "precision": precision, "kernels": args.kernels,
                          "attention": args.attention, "compile": args.compile, "steps": args.steps,
                          "warmup_steps": WARMUP_STEPS, "bf16_peak_tflops": peak_tflops,
                          "timer": "CUDA-synchronised wall clock (median)" if device.type == "cuda" else "wall clock",
                          "configs": [c.__dict__ for c in step_configs]},
               "rows": rows}
    if rows:  # on a CPU too, to runs/bench/ unless --out: its JSON says "smoke": true (no GPU speed in it)
        labels = [f"{r['config']} {r['checkpointing']}" for r in rows if r["impl"] == "ours"]
        series = {impl: [next((r.get("samples/s", 0.0) for r in rows if r["impl"] == impl
                               and f"{r['config']} {r['checkpointing']}" == label), 0.0) for label in labels]
                  for impl in dict.fromkeys(r["impl"] for r in rows)}
        write_report("step", payload, args.out, labels, series, "samples/s", "train step")
    return payload


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help=f"results folder (default {RESULTS_DIR} on a GPU)")
    parser.add_argument("--configs", type=lambda s: s.split(","), default=list(CONFIGS),
                        help=f"comma-separated, from {', '.join(CONFIGS)}")
    parser.add_argument("--checkpointing", type=lambda s: s.split(","), default=["none", "full"],
                        help="comma-separated train.checkpointing modes (diffusers: any mode but none = its own)")
    parser.add_argument("--kernels", default="torch", choices=["torch", "triton"])
    parser.add_argument("--attention", default="sdpa", help="model.attention_backend for our model")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp8-ao", "fp8-te"])
    parser.add_argument("--batch", type=int, default=0, help="micro-batch (default: per config)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block (both models)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps after the warm-up")
    parser.add_argument("--smoke", action="store_true", help="the tiny CPU config (always on without a GPU)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.configs if name not in CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {unknown}; expected names from {', '.join(CONFIGS)}")
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
