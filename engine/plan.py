"""Memory planner: predict a training run's peak GPU memory from its RunConfig, and answer what fits.

    python -m ristretto.engine.plan [--preset NAME] [--set key=value ...] [--gpu-gb 80] [--fit batch|frames|resolution]

The prediction counts, without building the model:
  persistent   fp32 master weights, fp32 gradients, AdamW m+v (fp32), the EMA copy, frozen encoders (SD VAE encoder in
               fp32, T5-XXL in bf16 on GPU) when the data is encoded live (0 for data.kind=cached).
  activations  every tensor autograd saves for backward in OUR blocks (model/blocks.py, kernels/reference.py), per
               part: LN-modulate (input, normalised values, mean/rstd, 1+scale), qkv (input), attention, proj,
               cross-attention, MLP (fc1 input, GELU input, fc2 input), gate-residual (gate, branch output), plus
               patch embedding, conditioning, final layer and loss. The residual stream is fp32 in every precision;
               under bf16 autocast linears save bf16 copies of their inputs and of their weights (autocast's cast
               is kept alive by backward). Checkpointed modules keep only their inputs.
  attention    what the backend saves: flash-style kernels (torch flash / efficient / cuDNN on CUDA, torch's
               flash-attention-for-CPU kernel that `sdpa` uses on CPU, fa2/3/4, xformers) keep q, k, v, out and the
               fp32 logsumexp (and the mask as an additive bias in q's dtype); `sdpa-math` keeps scaled copies of
               q, k, v and the softmax probabilities [N, h, Sq, Sk] instead. Measured on CPU with
               torch.autograd.graph.saved_tensors_hooks (tests/engine/test_plan.py).
  transient    during backward: one checkpointed unit recomputed, gradients in flight through the largest block,
               the attention backward's workspace; the optimizer step's temporaries; the VAE's encode buffers.
peak = persistent + max(backward phase, optimizer step, live encoding); `required` adds the CUDA context and a
fragmentation margin, which torch.cuda.max_memory_allocated does not see.

Approximations (checked on GPU by bench/memory.py, not on CPU): FP8 (fp8-te keeps fp8 copies of block linear inputs
and weights; fp8-ao's Float8Linear keeps bf16 ones, so it is planned as bf16), torch.compile (inductor usually saves
less: the plan is then an upper bound), DDP/FSDP (not modelled: single-process memory).

Use from train.py: `log.info("\\n%s", predict_memory(config).format())`.
"""
import argparse
import copy
import sys
from dataclasses import dataclass, field

import torch

from .checkpointing import CHECKPOINTING_MODES
from .config import PRESETS, ConfigError, build_config
from .flops import TIMESTEP_FEATURES, TokenGeometry, model_flops, recompute_flops, token_geometry

GIB = 2**30
FP32 = 4
ADAMW_STATE_BYTES = 2 * FP32            # exp_avg + exp_avg_sq per parameter
STATS_BYTES = 2 * FP32                  # LayerNorm mean + rstd per token (fp32)
CUDA_CONTEXT_BYTES = int(0.6 * GIB)     # CUDA context + kernels: outside torch's allocator
FRAGMENTATION = 0.05                    # caching-allocator slack on top of the allocated peak
SD_VAE_ENCODER_PARAMS = 34_163_592 + 72  # AutoencoderKL (SD) encoder + quant_conv; the decoder is not loaded
SD_VAE_WIDTH, VAE_CHUNK_FRAMES, VAE_LIVE_MAPS = 128, 16, 3  # full-resolution channels, frames per encode, live maps
T5_XXL_ENCODER_PARAMS = 4_762_310_656   # google/t5-v1_1-xxl T5EncoderModel
# Latent-sized fp32 tensors the loss saves (measured on engine/diffusion.py): the MSE keeps (prediction - target);
# the learned-sigma variational bound keeps 16 more and two bools (its torch.where conditions) of the same size.
LOSS_SAVED_FP32, VB_SAVED_FP32, VB_SAVED_BOOL = 1, 16, 2


@dataclass(frozen=True)
class SavedBytes:
    """Bytes per element of what the forward keeps, by precision. The residual stream, LayerNorm values and adaLN
    vectors are fp32 in every precision (the gate-residual add promotes bf16 branch outputs to fp32)."""
    linear_in: int          # a linear's saved input (autocast: its bf16 copy)
    block_linear_in: int    # the same for the FP8-eligible linears inside blocks
    out: int                # linear and attention outputs
    weight_copy: int        # autocast's weight cast, kept for backward (0 in fp32: the parameter itself)
    block_weight_copy: int


def saved_bytes(precision: str, fp8_eligible: bool) -> SavedBytes:
    if precision == "fp32":
        return SavedBytes(FP32, FP32, FP32, 0, 0)
    fp8_copies = 1 if precision == "fp8-te" and fp8_eligible else 2
    return SavedBytes(2, fp8_copies, 2, 2, fp8_copies)


def math_attention_bytes(out: int) -> int:
    """torch's math SDPA upcasts bf16/fp16 to fp32 inside (what it saves too) unless reduced precision is allowed."""
    return out if out == FP32 or torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed() else FP32


def attention_keeps_probabilities(backend: str) -> bool:
    """Only the math kernel keeps the [N, h, Sq, Sk] probabilities; every other backend keeps q, k, v, out, lse.
    `sdpa` on CPU runs torch's flash-attention-for-CPU kernel; on CUDA flash (bf16) or efficient (fp32, masks)."""
    return backend == "sdpa-math"


# ------------------------------------------------------------------------------------------------- parameters

def parameter_counts(g: TokenGeometry) -> dict[str, int]:
    """Parameters by part, as model/latte.py builds them."""
    d, m = g.hidden, g.mlp_hidden
    linear = lambda fan_in, fan_out: fan_in * fan_out + fan_out  # noqa: E731
    conditioning = linear(TIMESTEP_FEATURES, d) + linear(d, d)
    if g.kind == "t2v":
        conditioning += linear(d, 6 * d) + linear(g.caption_channels, d) + linear(d, d)
        conditioning += linear(d, d) if g.pooled_caption else 0
        modulation, final_modulation = 6 * d, 2 * d  # adaLN-single tables
    else:
        conditioning += (1 + g.num_classes) * d  # label table with the null class
        modulation, final_modulation = linear(d, 6 * d), linear(d, 2 * d)
    block = modulation + linear(d, 3 * d) + linear(d, d) + linear(d, m) + linear(m, d)
    cross = linear(d, d) + linear(d, 2 * d) + linear(d, d) if g.kind == "t2v" else 0
    return {
        "patch_embed": d * g.channels * g.patch * g.patch + d,
        "conditioning": conditioning,
        "spatial blocks": g.depth * (block + cross),
        "temporal blocks": g.depth * block,
        "final": final_modulation + linear(d, g.patch * g.patch * g.out_channels),
    }


# ------------------------------------------------------------------------------------------------ activations

@dataclass(frozen=True)
class BlockSpec:
    """One block's shapes and how it runs."""
    rows: int               # N
    length: int             # S: tokens per row
    spatial: bool
    cross: bool             # has cross-attention (spatial blocks of the text-to-video model)
    checkpointed: str       # "" | "block" | "mlp" | "attention"


def attention_saved(rows: int, queries: int, keys: int, g: TokenGeometry, out: int, probabilities: bool,
                    self_attention: bool, masked: bool) -> int:
    """Bytes the attention call itself keeps (q, k, v storage included), for [rows, queries] x [rows, keys]."""
    d, h = g.hidden, g.heads
    q_tokens, k_tokens = rows * queries, rows * keys
    if probabilities:  # math kernel: q*scale, k*scale, a contiguous v and the probabilities, then proj's input
        upcast = math_attention_bytes(out)
        return upcast * (q_tokens * d + 2 * k_tokens * d + rows * h * queries * keys) + out * q_tokens * d
    # flash-style: q, k, v (self-attention: one qkv storage), out (proj's input is a view of it), fp32 lse
    qkv = out * (3 * q_tokens * d if self_attention else q_tokens * d + 2 * k_tokens * d)
    return qkv + out * q_tokens * d + FP32 * rows * h * queries + (out * rows * keys if masked else 0)


def block_parts(g: TokenGeometry, spec: BlockSpec, saved: SavedBytes, probabilities: bool,
                triton_kernels: bool) -> dict[str, int]:
    """Bytes one block keeps for backward, by part (model/blocks.py LatteBlock with kernels/reference.py ops)."""
    d, m, tokens = g.hidden, g.mlp_hidden, spec.rows * spec.length
    if spec.checkpointed == "block":  # torch.utils.checkpoint keeps the block's input (the conditions are shared)
        return {"block input": FP32 * tokens * d}
    # The Triton LN-modulate saves x, mean, rstd and the compact [B, D] vectors, not the normalised values.
    vector_rows = g.batch if triton_kernels else spec.rows
    normed = 0 if triton_kernels else FP32 * tokens * d
    i, o, w = saved.block_linear_in, saved.out, saved.block_weight_copy
    vector = vector_bytes(g, saved) * vector_rows * d  # one expanded adaLN vector (1 + scale, or gate)
    parts = {
        "ln_modulate": 2 * (FP32 * tokens * d + normed + STATS_BYTES * tokens + vector),
        "gate_residual": 2 * (vector + o * tokens * d),
    }
    if spec.checkpointed == "attention":
        parts["attention"] = FP32 * tokens * d  # the checkpoint keeps its input (LN-modulate output, fp32)
    else:
        parts["attention"] = i * tokens * d + attention_saved(spec.rows, spec.length, spec.length, g, o, probabilities,
                                                              self_attention=True, masked=False)
        parts["weight copies"] = w * 4 * d * d
    if spec.cross:
        if spec.checkpointed == "attention":
            parts["cross_attention"] = FP32 * tokens * d  # its input x; the caption context is shared
        else:
            parts["cross_attention"] = i * tokens * d + attention_saved(
                spec.rows, spec.length, g.caption_length, g, o, probabilities, self_attention=False, masked=True)
            parts["weight copies"] += w * 4 * d * d
    if spec.checkpointed == "mlp":
        parts["mlp"] = FP32 * tokens * d
    else:
        parts["mlp"] = i * tokens * d + 2 * o * tokens * m  # fc1 input, GELU input, fc2 input
        parts["weight copies"] = parts.get("weight copies", 0) + w * 2 * d * m
    if g.kind == "class":  # adaLN-Zero: SiLU(cond) -> Linear(D, 6D) per block
        parts["modulation"] = saved.linear_in * g.batch * d
        parts["weight copies"] = parts.get("weight copies", 0) + saved.weight_copy * 6 * d * d
    return parts


def conditioning_bytes(g: TokenGeometry, saved: SavedBytes, blocks_checkpointed: bool) -> int:
    """Timestep MLP, caption projection, the shared caption context, class labels, patch embedding."""
    d, b, o, i, w = g.hidden, g.batch, saved.out, saved.linear_in, saved.weight_copy
    total = i * g.spatial_tokens * g.channels * g.patch * g.patch  # patch embedding's patchified input
    total += i * b * TIMESTEP_FEATURES + 2 * o * b * d + w * d * d  # timestep MLP: features, SiLU in, fc2 in
    if g.kind == "t2v":
        captions = b * (1 + g.images) * g.caption_length
        total += 2 * o * b * d + w * 6 * d * d  # t_block: SiLU in, linear in
        total += i * captions * g.caption_channels + 2 * o * captions * d + w * d * d  # caption projection
        total += o * g.context_rows * g.caption_length * d  # the context every cross-attention's kv linear keeps
        if g.pooled_caption:
            total += i * b * d + o * b * g.caption_length + w * d * d
        if blocks_checkpointed:
            total += o * b * 6 * d  # the adaLN-single input, kept once by the checkpoints
    else:
        total += 8 * b + FP32 * b * d  # label indices; the fp32 condition SiLU keeps (shared by all blocks)
    return total


def vector_bytes(g: TokenGeometry, saved: SavedBytes) -> int:
    """adaLN vectors: adaLN-Zero's come out of a linear (bf16 under autocast); adaLN-single's table sum is fp32."""
    return saved.out if g.kind == "class" else FP32


def final_and_loss_bytes(g: TokenGeometry, saved: SavedBytes, triton_kernels: bool) -> int:
    d, tokens = g.hidden, g.spatial_tokens
    vector_rows = g.batch if triton_kernels else g.spatial_rows
    normed = 0 if triton_kernels else FP32 * tokens * d
    total = FP32 * tokens * d + normed + STATS_BYTES * tokens + vector_bytes(g, saved) * vector_rows * d
    total += saved.linear_in * tokens * d + saved.weight_copy * d * g.patch * g.patch * g.out_channels
    if g.kind == "class":
        total += saved.linear_in * g.batch * d + saved.weight_copy * 2 * d * d
    elements = g.latent_elements
    total += FP32 * LOSS_SAVED_FP32 * elements
    if g.learn_sigma:
        total += FP32 * VB_SAVED_FP32 * elements + VB_SAVED_BOOL * elements
    return total


def block_specs(g: TokenGeometry, mode: str, every: int) -> list[BlockSpec]:
    """The 2 * depth blocks in model order (spatial, temporal, ...) with what `mode` checkpoints in each."""
    specs = []
    for index in range(2 * g.depth):
        spatial = index % 2 == 0
        if mode == "full" or (mode == "every-k" and index % every == 0):
            checkpointed = "block"
        else:
            checkpointed = {"selective-mlp": "mlp", "selective-attention": "attention"}.get(mode, "")
        rows, length = (g.spatial_rows, g.tokens_per_frame) if spatial else (g.temporal_rows, g.frames)
        specs.append(BlockSpec(rows, length, spatial, spatial and g.kind == "t2v", checkpointed))
    return specs


# --------------------------------------------------------------------------------------------------- the plan

@dataclass
class MemoryPlan:
    """Predicted memory of one training process, in bytes. `breakdown` holds every term; `peak_bytes` is what
    torch.cuda.max_memory_allocated should report; `required_bytes` adds the CUDA context and fragmentation."""
    breakdown: dict[str, int]
    peak_bytes: int
    required_bytes: int
    block_parts: dict[str, dict[str, int]]  # "spatial" / "temporal" -> per-part bytes of one block (first of its kind)
    summary: dict = field(default_factory=dict)

    @property
    def activation_bytes(self) -> int:
        """Everything saved for backward at the end of the forward (what saved_tensors_hooks sees)."""
        return sum(value for key, value in self.breakdown.items() if key.startswith("activations."))

    def fits(self, gpu_bytes: float) -> bool:
        return self.required_bytes <= gpu_bytes

    def format(self) -> str:
        """A table: persistent terms, activations saved for backward, backward transients, phases, peak."""
        s = self.summary
        title = (f"memory plan: {s['preset']}, batch {s['batch']} x {s['frames']} frames x {s['resolution']}^2 "
                 f"({s['tokens_per_frame']} tokens/frame), {s['precision']}, checkpointing {s['checkpointing']}, "
                 f"attention {s['attention']}, {s['parameters'] / 1e6:.1f}M parameters")
        lines = [title, f"{'':<48}{'GiB':>9}"]

        def add(label: str, value: int, indent: bool = False) -> None:
            lines.append(f"{'  ' * indent + label:<48}{value / GIB:>9.3f}")

        groups = {"activations.": "activations saved for backward", "transient.": "backward transients"}
        done = set()
        for key, value in self.breakdown.items():
            prefix = next((p for p in groups if key.startswith(p)), None)
            if prefix and prefix not in done:
                done.add(prefix)
                add(groups[prefix], sum(v for k, v in self.breakdown.items() if k.startswith(prefix)))
            add(key.removeprefix(prefix) if prefix else key, value, indent=bool(prefix))
        add("peak allocated (torch.cuda.max_memory_allocated)", self.peak_bytes)
        add("required (+ CUDA context, fragmentation)", self.required_bytes)
        for layout, parts in self.block_parts.items():
            cells = ", ".join(f"{name} {value / 2**20:.1f}" for name, value in parts.items())
            lines.append(f"one {layout} block, MiB: {cells}")
        return "\n".join(lines)


def predict_memory(config, device_type: str = "cuda", batch: int | None = None) -> MemoryPlan:
    """Predict the peak memory of training `config` on one `device_type` device ("cuda" or "cpu")."""
    train, model = config.train, config.model
    g = token_geometry(config, batch)
    counts = parameter_counts(g)
    params = sum(counts.values())
    trainable = counts["temporal blocks"] if model.freeze == "spatial" else params  # gradients + AdamW state only here
    fp8_eligible = all(dim % 16 == 0 and dim >= 64 for dim in (g.hidden, g.mlp_hidden))
    saved = saved_bytes(train.precision, fp8_eligible)
    probabilities = attention_keeps_probabilities(model.attention_backend)
    triton = model.kernels == "triton"
    specs = block_specs(g, train.checkpointing, train.checkpointing_every)

    per_block = [block_parts(g, spec, saved, probabilities, triton) for spec in specs]
    breakdown = {
        "weights (fp32 master)": FP32 * params,
        "gradients (fp32)": FP32 * trainable,
        "optimizer (AdamW m+v, fp32)": ADAMW_STATE_BYTES * trainable,
        "ema (fp32 copy)": FP32 * params if train.ema_decay > 0 else 0,
        "encoders (frozen)": encoder_weight_bytes(config, device_type),
        "activations.spatial blocks": sum(sum(p.values()) for p, s in zip(per_block, specs) if s.spatial),
        "activations.temporal blocks": sum(sum(p.values()) for p, s in zip(per_block, specs) if not s.spatial),
        "activations.embed + conditioning": conditioning_bytes(g, saved, any(s.checkpointed == "block" for s in specs)),
        "activations.final layer + loss": final_and_loss_bytes(g, saved, triton),
        "transient.recompute (one checkpointed unit)": recompute_bytes(g, specs, saved, probabilities, triton),
        "transient.gradients in flight": gradients_in_flight(g, saved),
        "transient.attention backward workspace": attention_workspace(g, saved, probabilities),
        "optimizer step workspace": FP32 * trainable,  # foreach AdamW's denominators
        "encode workspace (live VAE)": encode_workspace(config, g),
    }
    peak = peak_from(breakdown, train.grad_accum)
    required = int(peak * (1 + FRAGMENTATION)) + (CUDA_CONTEXT_BYTES if device_type == "cuda" else 0)
    layouts = {"spatial": True, "temporal": False}
    block_table = {name: next(p for p, s in zip(per_block, specs) if s.spatial == spatial)
                   for name, spatial in layouts.items()}
    summary = dict(preset=config.preset, batch=g.batch, frames=g.frames, resolution=config.data.resolution,
                   tokens_per_frame=g.tokens_per_frame, precision=train.precision, checkpointing=train.checkpointing,
                   attention=model.attention_backend, parameters=params, device_type=device_type)
    return MemoryPlan(breakdown, peak, required, block_table, summary)


def peak_from(breakdown: dict[str, int], grad_accum: int) -> int:
    """persistent + the largest of: backward (activations while gradients grow), optimizer step, live encoding."""
    persistent = sum(breakdown[key] for key in ("weights (fp32 master)", "optimizer (AdamW m+v, fp32)",
                                                "ema (fp32 copy)", "encoders (frozen)"))
    activations = sum(v for k, v in breakdown.items() if k.startswith("activations."))
    transient = sum(v for k, v in breakdown.items() if k.startswith("transient."))
    grads = breakdown["gradients (fp32)"]
    # Backward frees activations block by block while gradients appear, so with one micro-batch the two peak at
    # opposite ends; with accumulation the earlier micro-batches' gradients are alive through the whole forward.
    backward = (activations + grads if grad_accum > 1 else max(activations, grads)) + transient
    step = grads + breakdown["optimizer step workspace"]
    encode = breakdown["encode workspace (live VAE)"] + (grads if grad_accum > 1 else 0)
    return persistent + max(backward, step, encode)


def recompute_bytes(g, specs, saved, probabilities, triton) -> int:
    """The largest unit a checkpoint recomputes in backward: its full activations exist again for a moment."""
    largest = 0
    for spec in specs:
        if not spec.checkpointed:
            continue
        full = block_parts(g, BlockSpec(spec.rows, spec.length, spec.spatial, spec.cross, ""), saved, probabilities,
                           triton)
        if spec.checkpointed == "block":
            largest = max(largest, sum(full.values()))
        elif spec.checkpointed == "mlp":
            largest = max(largest, full["mlp"])
        else:
            largest = max(largest, full["attention"], full.get("cross_attention", 0))
    return largest


def gradients_in_flight(g: TokenGeometry, saved: SavedBytes) -> int:
    """Backward of the largest block: the residual gradient in and out (fp32) and the MLP hidden's two gradients."""
    tokens = max(g.spatial_tokens, g.temporal_tokens)
    return 2 * FP32 * tokens * g.hidden + 2 * saved.out * tokens * g.mlp_hidden


def attention_workspace(g: TokenGeometry, saved: SavedBytes, probabilities: bool) -> int:
    """Attention backward's scratch: fp32 dq accumulator + row sums (flash-style), or score gradients (math)."""
    shapes = [(g.spatial_rows, g.tokens_per_frame, g.tokens_per_frame), (g.temporal_rows, g.frames, g.frames)]
    if g.kind == "t2v":
        shapes.append((g.spatial_rows, g.tokens_per_frame, g.caption_length))
    if probabilities:
        return max(2 * math_attention_bytes(saved.out) * rows * g.heads * sq * sk for rows, sq, sk in shapes)
    return max(FP32 * rows * sq * (g.hidden + g.heads) for rows, sq, _ in shapes)


def encoder_weight_bytes(config, device_type: str) -> int:
    """Frozen VAE encoder (fp32) and T5-XXL (bf16 on GPU, fp32 on CPU) when the data is encoded live."""
    if config.data.kind == "cached":
        return 0
    total = FP32 * SD_VAE_ENCODER_PARAMS if config.model.vae != "identity" else 0
    if config.model.kind == "t2v" and config.model.text_encoder != "synthetic":
        total += (2 if device_type == "cuda" else FP32) * T5_XXL_ENCODER_PARAMS
    return total


def encode_workspace(config, g: TokenGeometry) -> int:
    """The VAE encodes VAE_CHUNK_FRAMES frames at a time; its full-resolution feature maps dominate (no grad)."""
    if config.data.kind == "cached" or config.model.vae == "identity":
        return 0
    frames = min(VAE_CHUNK_FRAMES, g.spatial_rows)
    pixels = config.data.resolution ** 2
    return FP32 * VAE_LIVE_MAPS * frames * SD_VAE_WIDTH * pixels


# ---------------------------------------------------------------------------------------------- what fits

FIT_FIELDS = {"batch": "train.batch_size", "frames": "data.frames", "resolution": "data.resolution"}
FIT_LIMIT = 1 << 14  # search ceiling (in units of the field's step)


def with_value(config, key: str, value) -> object:
    changed = copy.deepcopy(config)
    section, name = key.split(".")
    setattr(getattr(changed, section), name, value)
    return changed


def fit_step(config, what: str) -> int:
    """Resolution must stay a multiple of the patch (and of the VAE's 8x); batch and frames move by one."""
    if what != "resolution":
        return 1
    return config.model.patch_size * (1 if config.model.vae == "identity" else 8)


def largest_that_fits(config, what: str, gpu_bytes: float, device_type: str = "cuda") -> int | None:
    """The largest batch / frames / resolution whose plan fits in gpu_bytes (others as in config); None if none.
    Memory grows with each of them, so a doubling search then bisection finds the boundary."""
    if what not in FIT_FIELDS:
        raise ValueError(f"--fit: got {what!r}; expected one of {', '.join(FIT_FIELDS)}")
    key, step = FIT_FIELDS[what], fit_step(config, what)

    def fits(units: int) -> bool:
        return predict_memory(with_value(config, key, units * step), device_type).fits(gpu_bytes)

    if not fits(1):
        return None
    low, high = 1, 2
    while high <= FIT_LIMIT and fits(high):
        low, high = high, high * 2
    if high > FIT_LIMIT:
        return low * step
    while high - low > 1:  # fits(low) and not fits(high)
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low * step


def checkpointing_needed(config, gpu_bytes: float, device_type: str = "cuda") -> str | None:
    """The checkpointing mode with the least recomputation whose plan fits; None when even `full` does not."""
    for mode in sorted(CHECKPOINTING_MODES, key=lambda mode: recompute_flops(config, mode)):
        if predict_memory(with_value(config, "train.checkpointing", mode), device_type).fits(gpu_bytes):
            return mode
    return None


def mode_table(config, gpu_bytes: float, what: str | None, device_type: str = "cuda") -> list[dict]:
    """Per checkpointing mode: required GiB, recompute as % of forward FLOPs, and (with `what`) the largest fit."""
    forward = model_flops(config).forward
    rows = []
    for mode in CHECKPOINTING_MODES:
        moded = with_value(config, "train.checkpointing", mode)
        row = {"checkpointing": mode, "required GiB": predict_memory(moded, device_type).required_bytes / GIB,
               "recompute %": 100.0 * recompute_flops(moded, mode) / forward}
        if what:
            row[f"largest {what}"] = largest_that_fits(moded, what, gpu_bytes, device_type)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------------ CLI

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ristretto-plan", description="Predict peak training memory; what fits.")
    parser.add_argument("--preset", default="tiny-t2v", help=f"one of: {', '.join(PRESETS)} (default: tiny-t2v)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set train.batch_size=4 (repeatable)")
    parser.add_argument("--gpu-gb", type=float, default=80.0, help="device memory in GiB (default 80)")
    parser.add_argument("--fit", choices=list(FIT_FIELDS), default=None,
                        help="also report the largest batch / frames / resolution that fits, per checkpointing mode")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config = build_config(args.preset, args.overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    gpu_bytes = args.gpu_gb * GIB
    plan = predict_memory(config)
    print(plan.format())
    print(f"fits in {args.gpu_gb:g} GiB: {'yes' if plan.fits(gpu_bytes) else 'no'}")
    needed = checkpointing_needed(config, gpu_bytes)
    print(f"checkpointing needed: {needed or 'none fits (reduce batch, frames or resolution)'}"
          + (" (the least recomputation that fits)" if needed else ""))
    from ristretto.bench.common import format_table  # noqa: PLC0415 - only the CLI prints tables

    print(format_table(mode_table(config, gpu_bytes, args.fit)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
