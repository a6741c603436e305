"""Memory planner: predict a training run's peak GPU memory from its RunConfig, and answer what fits.

    python -m ristretto.engine.plan [--preset NAME] [--set key=value ...] [--gpu-gb 80] [--fit batch|frames|resolution]

The prediction counts, without building the model:
  persistent   fp32 master weights, fp32 gradients, AdamW m+v (fp32), the EMA copy, frozen encoders (SD VAE encoder in
               fp32, T5-XXL in bf16 on GPU) when the data is encoded live (0 for data.kind=cached).
  activations  every tensor autograd saves for backward in OUR blocks (model/blocks.py; the attention branch of
               model/attention.py and the MLP branch of model/mlp.py, each with its LN-modulate and gated residual
               fused into its linears: kernels/lean_linear.py, kernels/gelu_mlp.py), per part: the attention
               branch's input (the residual: LN-modulate is recomputed in backward), attention (q, k, v, out, lse;
               proj keeps a view of out, the gate's gradient needs no projection output), cross-attention (query
               input, query, out, lse), MLP (the residual and the GELU input only), plus patch embedding,
               conditioning, final layer and loss. The residual stream is train.residual_dtype under
               bf16/fp8 (fp32 otherwise); LN-modulate emits the activation dtype; under bf16 autocast linears save
               bf16 copies of their weights (autocast's cast is kept alive by backward), the MLP keeps the fp32 ones.
               Checkpointed modules keep only their inputs; checkpointing=auto picks per block (`auto_choices`).
  attention    what the backend saves: flash-style kernels (torch flash / efficient / cuDNN on CUDA, torch's
               flash-attention-for-CPU kernel that `sdpa` uses on CPU, fa2/3/4, xformers) keep q, k, v, out and the
               fp32 logsumexp (and the mask as an additive bias in q's dtype); `sdpa-math` keeps scaled copies of
               q, k, v and the softmax probabilities [N, h, Sq, Sk] instead. Measured on CPU with
               torch.autograd.graph.saved_tensors_hooks (tests/engine/test_plan.py).
  transient    during backward: one checkpointed unit recomputed, gradients in flight through the largest block,
               the attention backward's workspace (flash: the fp32 dq accumulator at the padded head dim, 72 -> 96,
               and the query length rounded to 128); the optimizer step's temporaries; the VAE's encode buffers;
               cuBLAS workspaces (per thread: forward and autograd's).
peak = persistent + max(backward phase, optimizer step, live encoding); `required` adds the CUDA context and a
fragmentation margin (2% with expandable segments, which train.py turns on unless PYTORCH_CUDA_ALLOC_CONF is set;
5% without), which torch.cuda.max_memory_allocated does not see.

Approximations (checked on GPU by bench/memory.py, not on CPU): FP8 (when engine/precision's FP8 rule converts the
block linears, fp8-te keeps for backward only the transposed (column-wise) FP8 copy of each input, and both the
row-wise and the transposed FP8 copy of each weight (TE module/linear.py on Hopper); fp8-ao's Float8Linear keeps bf16
ones, so it is planned as bf16), torch.compile (inductor usually saves
less: the plan is then an upper bound), DDP/FSDP (not modelled: single-process memory).

Use from train.py: `log.info("\\n%s", predict_memory(config).format())`.
"""
import argparse
import copy
import os
import sys
from dataclasses import dataclass, field

import torch

from .checkpointing import AUTO, BLOCK_CHOICES, CHECKPOINTING_MODES
from .config import PRESETS, ConfigError, build_config
from .precision import fp8_by_shape, fp8_rule_text, fp8_shape_pays_off
from .flops import TIMESTEP_FEATURES, TokenGeometry, block_flops, model_flops, recompute_flops, token_geometry

GIB = 2**30
FP32 = 4
ADAMW_STATE_BYTES = 2 * FP32            # exp_avg + exp_avg_sq per parameter
STATS_BYTES = 2 * FP32                  # LayerNorm mean + rstd per token (fp32)
CUDA_CONTEXT_BYTES = int(0.6 * GIB)     # CUDA context + kernels: outside torch's allocator
FRAGMENTATION = 0.05                    # caching-allocator slack on top of the allocated peak (fixed segments)
FRAGMENTATION_EXPANDABLE = 0.02         # the same with expandable_segments:True (what train.py sets by default)
# cuBLAS workspaces come from torch's allocator: one per handle, and handles are per thread (the forward's and the
# autograd engine's device thread); 32 MiB each on Hopper and later (torch's default CUBLAS_WORKSPACE_CONFIG).
CUBLAS_WORKSPACE_BYTES = 2 * 32 * 2**20
FLASH_SEQ_TILE = 128                    # flash-attention rounds the query length up to this in its dq accumulator
FLASH_HEAD_DIMS = (32, 64, 96, 128, 160, 192, 224, 256)  # compiled head dims: 72 runs the 96-wide kernel
SD_VAE_ENCODER_PARAMS = 34_163_592 + 72  # AutoencoderKL (SD) encoder + quant_conv; the decoder is not loaded
SD_VAE_WIDTH, VAE_CHUNK_FRAMES, VAE_LIVE_MAPS = 128, 16, 3  # full-resolution channels, frames per encode, live maps
T5_XXL_ENCODER_PARAMS = 4_762_310_656   # google/t5-v1_1-xxl T5EncoderModel
# Latent-sized fp32 tensors the loss saves (measured on engine/diffusion.py): the MSE keeps (prediction - target);
# the learned-sigma variational bound keeps 16 more and two bools (its torch.where conditions) of the same size.
LOSS_SAVED_FP32, VB_SAVED_FP32, VB_SAVED_BOOL = 1, 16, 2


@dataclass(frozen=True)
class SavedBytes:
    """Bytes per element of what the forward keeps, by precision and train.residual_dtype."""
    linear_in: int          # a linear's saved input (autocast: its bf16 copy)
    block_linear_in: int    # the same for the FP8-eligible linears inside blocks
    out: int                # linear and attention outputs; LN-modulate outputs (emitted in the activation dtype)
    weight_copy: int        # autocast's weight cast, kept for backward (0 in fp32: the parameter itself)
    block_weight_copy: int
    residual: int = FP32    # the residual stream: every saved block input and LayerNorm input
    fp8: bool = False       # block linears converted (the MLP then runs as modules, keeping GELU's output too)


def saved_bytes(precision: str, fp8_eligible: bool, residual_dtype: str = "fp32") -> SavedBytes:
    if precision == "fp32":
        return SavedBytes(FP32, FP32, FP32, 0, 0)
    residual = 2 if residual_dtype == "bf16" else FP32
    fp8 = precision.startswith("fp8") and fp8_eligible
    # fp8-te keeps a block linear's input as its transposed FP8 copy only, its weight as row-wise + transposed copies
    te_input = 1 if precision == "fp8-te" and fp8_eligible else 2
    return SavedBytes(2, te_input, 2, 2, 2, residual, fp8)


def fp8_block_linears(g: TokenGeometry, by_shape: bool = False) -> bool:
    """Whether engine/precision's FP8 rule converts the block linears (qkv, proj, fc1, fc2) at this geometry
    (`by_shape`: its shape part only, as train.fp8_linears=shape and emulation apply it)."""
    rows = None if by_shape else g.batch * (g.frames + g.images) * g.tokens_per_frame
    shapes = [(g.hidden, 3 * g.hidden), (g.hidden, g.hidden), (g.hidden, g.mlp_hidden), (g.mlp_hidden, g.hidden)]
    return all(fp8_shape_pays_off(k, n, rows) for k, n in shapes)


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
                    self_attention: bool, masked: bool, key_rows: int | None = None) -> int:
    """Bytes the attention call itself keeps (q, k, v storage included), for [rows, queries] x [key_rows, keys]
    (key_rows < rows: cross-attention's caption K/V shared by the frames of a sample, not repeated)."""
    d, h = g.hidden, g.heads
    key_rows = rows if key_rows is None else key_rows
    q_tokens, k_tokens = rows * queries, key_rows * keys
    if probabilities:  # math kernel: q*scale, k*scale, a contiguous v and the probabilities, then proj's input
        upcast = math_attention_bytes(out)
        return upcast * (q_tokens * d + 2 * k_tokens * d + rows * h * queries * keys) + out * q_tokens * d
    # flash-style: q, k, v (self-attention: one qkv storage), out (proj's input is a view of it), fp32 lse
    qkv = out * (3 * q_tokens * d if self_attention else q_tokens * d + 2 * k_tokens * d)
    return qkv + out * q_tokens * d + FP32 * rows * h * queries + (out * k_tokens if masked else 0)


def block_parts(g: TokenGeometry, spec: BlockSpec, saved: SavedBytes, probabilities: bool,
                triton_kernels: bool) -> dict[str, int]:
    """Bytes one block keeps for backward, by part (model/blocks.py LatteBlock with the lean ops of kernels/lean.py
    or the Triton kernels, and model/mlp.py)."""
    d, m, tokens = g.hidden, g.mlp_hidden, spec.rows * spec.length
    r, i, o, w = saved.residual, saved.block_linear_in, saved.out, saved.block_weight_copy
    if spec.checkpointed == "block":  # torch.utils.checkpoint keeps the block's input (the conditions are shared)
        return {"block input": r * tokens * d}
    vector = vector_bytes(g, saved)
    stats = STATS_BYTES * tokens if triton_kernels else 0
    attention_checkpointed = spec.checkpointed == "attention"
    attention = 0 if attention_checkpointed else attention_saved(spec.rows, spec.length, spec.length, g, o,
                                                                 probabilities, self_attention=True, masked=False)
    # The attention branch (model/attention.py) keeps its input x, the residual, and reads the block's adaLN vectors
    # (one [B, 6, D] storage, shared with the MLP op); a checkpointed branch keeps the same as its checkpoint's input.
    parts = {"attention input": r * tokens * d + vector * g.batch * 6 * d}
    if not saved.fp8 or attention_checkpointed:
        # kernels/lean_linear.py: LN-modulate + qkv keeps x only; proj + gated residual keeps the attention output
        # (a view of what the attention keeps) and the gate; both keep the fp32 weights, not bf16 copies
        parts["attention"] = attention
    else:  # FP8-converted linears run as modules: the LN-modulate's stats (Triton), qkv's input, proj's output and
        # the gate (torch's gated residual: expanded to [N, 1, D]), and the weights' copies
        rows = spec.rows if spec.spatial else g.batch * g.frames  # temporal blocks run on the video rows [B*F, S, D]
        parts["attention input"] += stats
        parts["gate_residual"] = o * tokens * d + (0 if triton_kernels else vector * rows * d)
        parts["attention"] = i * tokens * d + attention
        parts["weight copies"] = w * 4 * d * d
    if spec.cross:
        if spec.checkpointed == "attention":
            parts["cross_attention"] = r * tokens * d  # its input x; the caption context is shared
        else:
            parts["cross_attention"] = i * tokens * d + attention_saved(
                spec.rows, spec.length, g.caption_length, g, o, probabilities, self_attention=False, masked=True,
                key_rows=g.context_rows)
            parts["weight copies"] = parts.get("weight copies", 0) + w * 4 * d * d
    if spec.checkpointed == "mlp":
        parts["mlp"] = r * tokens * d  # the checkpoint keeps its input, the residual
    elif saved.fp8:  # converted linears run as modules: LN input and stats, fc1 input, GELU in and out, fc2 out
        parts["mlp"] = r * tokens * d + stats + i * tokens * d + 2 * o * tokens * m + o * tokens * d
        parts["weight copies"] = parts.get("weight copies", 0) + w * 2 * d * m
    else:  # kernels/gelu_mlp.py: the residual and the GELU input; the fp32 weights, not bf16 copies
        parts["mlp"] = r * tokens * d + o * tokens * m
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
    stats = STATS_BYTES * tokens if triton_kernels else 0
    total = saved.residual * tokens * d + stats + vector_bytes(g, saved) * g.batch * 2 * d
    total += saved.linear_in * tokens * d + saved.weight_copy * d * g.patch * g.patch * g.out_channels
    if g.kind == "class":
        total += saved.linear_in * g.batch * d + saved.weight_copy * 2 * d * d
    elements = g.latent_elements
    total += FP32 * LOSS_SAVED_FP32 * elements
    if g.learn_sigma:
        total += FP32 * VB_SAVED_FP32 * elements + VB_SAVED_BOOL * elements
    return total


CHOICE_CHECKPOINTS = {"none": "", "mlp": "mlp", "attention": "attention", "full": "block"}


def block_specs(g: TokenGeometry, mode: str, every: int, choices: list[str] | None = None) -> list[BlockSpec]:
    """The 2 * depth blocks in model order (spatial, temporal, ...) with what `mode` (or, for auto, the per-block
    `choices`) checkpoints in each."""
    specs = []
    for index in range(2 * g.depth):
        spatial = index % 2 == 0
        if choices is not None:
            checkpointed = CHOICE_CHECKPOINTS[choices[index]]
        elif mode == "full" or (mode == "every-k" and index % every == 0):
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
    choices: list[str] | None = None  # checkpointing=auto: what each block recomputes (BLOCK_CHOICES), model order

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
                 f"({s['tokens_per_frame']} tokens/frame), {s['precision']} (residual {s['residual']}), kernels "
                 f"{s['kernels']}, checkpointing {s['checkpointing']}, attention {s['attention']}, "
                 f"{s['parameters'] / 1e6:.1f}M parameters")
        lines = [title] + ([s["fp8"]] if s.get("fp8") else []) + [f"{'':<48}{'GiB':>9}"]

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
        if self.choices is not None:
            lines.append(f"checkpointing auto: {describe_choices(self.choices)}")
        return "\n".join(lines)


def predict_memory(config, device_type: str = "cuda", batch: int | None = None, choices: list[str] | None = None,
                   budget_bytes: float | None = None) -> MemoryPlan:
    """Predict the peak memory of training `config` on one `device_type` device ("cuda" or "cpu").
    checkpointing=auto plans against `budget_bytes` (default: `memory_budget_bytes`) unless `choices` are given."""
    train, model = config.train, config.model
    if train.checkpointing == AUTO and choices is None:
        choices = auto_choices(config, memory_budget_bytes(config, device_type, budget_bytes), device_type, batch)
    g = token_geometry(config, batch)
    counts = parameter_counts(g)
    params = sum(counts.values())
    trainable = counts["temporal blocks"] if model.freeze == "spatial" else params  # gradients + AdamW state only here
    fp8_eligible = fp8_block_linears(g, by_shape=fp8_by_shape(train))
    saved = saved_bytes(train.precision, fp8_eligible, train.residual_dtype)
    probabilities = attention_keeps_probabilities(model.attention_backend)
    triton = model.kernels == "triton"
    specs = block_specs(g, train.checkpointing, train.checkpointing_every, choices)

    per_block = [block_parts(g, spec, saved, probabilities, triton) for spec in specs]
    breakdown = {
        "weights (fp32 master)": FP32 * params,
        "gradients (fp32)": FP32 * trainable,
        "optimizer (AdamW m+v, fp32)": ADAMW_STATE_BYTES * trainable,
        "ema (fp32 copy)": FP32 * params if train.ema_decay > 0 else 0,
        "encoders (frozen)": encoder_weight_bytes(config, device_type),
        "cuBLAS workspaces": CUBLAS_WORKSPACE_BYTES if device_type == "cuda" else 0,
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
    required = int(peak * (1 + fragmentation_margin())) + (CUDA_CONTEXT_BYTES if device_type == "cuda" else 0)
    layouts = {"spatial": True, "temporal": False}
    block_table = {name: next(p for p, s in zip(per_block, specs) if s.spatial == spatial)
                   for name, spatial in layouts.items()}
    summary = dict(preset=config.preset, batch=g.batch, frames=g.frames, resolution=config.data.resolution,
                   tokens_per_frame=g.tokens_per_frame, precision=train.precision, checkpointing=train.checkpointing,
                   attention=model.attention_backend, parameters=params, device_type=device_type,
                   residual=train.residual_dtype, kernels=model.kernels,
                   fp8=fp8_summary(train, fp8_eligible))
    return MemoryPlan(breakdown, peak, required, block_table, summary, choices)


def fp8_summary(train, fp8_eligible: bool) -> str:
    """The plan's FP8 line: whether the block linears go to FP8, and by which rule."""
    if not train.precision.startswith("fp8"):
        return ""
    converted = "block linears in FP8" if fp8_eligible else "block linears stay bf16"
    if fp8_by_shape(train):
        why = "emulated: " if train.fp8_emulate else "train.fp8_linears=shape: "
        return f"{converted} ({why}every block linear (not adaLN) with both dims divisible by 16)"
    return f"{converted} ({fp8_rule_text()})"


def peak_from(breakdown: dict[str, int], grad_accum: int) -> int:
    """persistent + the largest of: backward (activations while gradients grow), optimizer step, live encoding."""
    persistent = sum(breakdown[key] for key in ("weights (fp32 master)", "optimizer (AdamW m+v, fp32)",
                                                "ema (fp32 copy)", "encoders (frozen)", "cuBLAS workspaces"))
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


def fragmentation_margin() -> float:
    """The allocator's slack: smaller with expandable segments (train.py's default unless the user set the variable)."""
    setting = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    expandable = setting is None or "expandable_segments:True" in setting
    return FRAGMENTATION_EXPANDABLE if expandable else FRAGMENTATION


def flash_padded_head_dim(head_dim: int) -> int:
    """The head dim of the flash kernel that runs `head_dim` (72 -> 96): its workspaces are that wide."""
    return next((dim for dim in FLASH_HEAD_DIMS if dim >= head_dim), head_dim)


def attention_workspace(g: TokenGeometry, saved: SavedBytes, probabilities: bool) -> int:
    """Attention backward's scratch: flash-style fp32 dq accumulator at the padded head dim and query length, plus
    row sums; or score gradients (math)."""
    shapes = [(g.spatial_rows, g.tokens_per_frame, g.tokens_per_frame), (g.temporal_rows, g.frames, g.frames)]
    if g.kind == "t2v":
        shapes.append((g.spatial_rows, g.tokens_per_frame, g.caption_length))
    if probabilities:
        return max(2 * math_attention_bytes(saved.out) * rows * g.heads * sq * sk for rows, sq, sk in shapes)
    padded = flash_padded_head_dim(g.hidden // g.heads)
    return max(FP32 * rows * -(-sq // FLASH_SEQ_TILE) * FLASH_SEQ_TILE * g.heads * (padded + 1)
               for rows, sq, _ in shapes)


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


# ------------------------------------------------------------------------------------- checkpointing=auto

def memory_budget_bytes(config, device_type: str = "cuda", default_bytes: float | None = None) -> float:
    """train.memory_budget_gb, else `default_bytes` (the CLI's --gpu-gb), else the GPU's memory."""
    if config.train.memory_budget_gb > 0:
        return config.train.memory_budget_gb * GIB
    if default_bytes is not None:
        return default_bytes
    if device_type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    raise ValueError("train.memory_budget_gb: train.checkpointing=auto needs a memory budget when no GPU is "
                     "visible; set e.g. --set train.memory_budget_gb=80")


def choice_flops(g: TokenGeometry, spatial: bool, choice: str) -> float:
    """Forward FLOPs one block runs again in backward when it recomputes `choice`."""
    parts = block_flops(g, spatial)
    recomputed = {"none": (), "mlp": ("mlp",), "attention": ("attention", "cross_attention")}.get(choice)
    return sum(parts.values()) if recomputed is None else sum(parts.get(name, 0.0) for name in recomputed)


def auto_recompute_flops(config, choices: list[str], batch: int | None = None) -> float:
    g = token_geometry(config, batch)
    return sum(choice_flops(g, index % 2 == 0, choice) for index, choice in enumerate(choices))


def describe_choices(choices: list[str]) -> str:
    """'spatial 14 none, 14 mlp; temporal 28 none (14 of 56 blocks recompute something)'."""
    cells = []
    for name, kind in (("spatial", choices[0::2]), ("temporal", choices[1::2])):
        cells.append(f"{name} " + ", ".join(f"{kind.count(c)} {c}" for c in BLOCK_CHOICES if kind.count(c)))
    recomputing = sum(c != "none" for c in choices)
    return f"{'; '.join(cells)} ({recomputing} of {len(choices)} blocks recompute something)"


UPGRADE_SETS = (BLOCK_CHOICES[1:], ("full",), ("attention", "full"), ("mlp", "full"))


def auto_choices(config, budget_bytes: float, device_type: str = "cuda", batch: int | None = None) -> list[str]:
    """What each block recomputes (BLOCK_CHOICES) so the plan's `required` fits budget_bytes, with the least
    recompute FLOPs. Greedy: from nothing recomputed, repeatedly take the upgrade (one block moving to a choice that
    keeps less) with the most bytes saved per FLOP until the plan fits; run once per set of allowed choices
    (UPGRADE_SETS: a partial recompute that is cheap per byte can still cost more in total than fewer whole blocks)
    and keep the cheapest. All-`full` when nothing else fits."""
    g = token_geometry(config, batch)
    train, model = config.train, config.model
    fp8_eligible = all(dim % 16 == 0 and dim >= 64 for dim in (g.hidden, g.mlp_hidden))
    saved = saved_bytes(train.precision, fp8_eligible, train.residual_dtype)
    probabilities = attention_keeps_probabilities(model.attention_backend)
    specs = block_specs(g, "none", 1)[:2]  # one spatial, one temporal

    def block_bytes(kind: int, choice: str) -> int:
        spec = specs[kind]
        spec = BlockSpec(spec.rows, spec.length, spec.spatial, spec.cross, CHOICE_CHECKPOINTS[choice])
        return sum(block_parts(g, spec, saved, probabilities, model.kernels == "triton").values())

    # per kind (0: spatial, 1: temporal): bytes kept and FLOPs recomputed by each choice
    cost = {(kind, c): (block_bytes(kind, c), choice_flops(g, kind == 0, c)) for kind in (0, 1) for c in BLOCK_CHOICES}

    def greedy(allowed) -> list[str] | None:
        choices = ["none"] * (2 * g.depth)
        while not predict_memory(config, device_type, batch, choices).fits(budget_bytes):
            best = None
            for index, current in enumerate(choices):
                kept, flops = cost[index % 2, current]
                for upgrade in allowed:
                    upgrade_kept, upgrade_flops = cost[index % 2, upgrade]
                    if upgrade_kept < kept:
                        ratio = (kept - upgrade_kept) / max(upgrade_flops - flops, 1.0)
                        best = max(best or (ratio, index, upgrade), (ratio, index, upgrade))
            if best is None:
                return None
            choices[best[1]] = best[2]
        return choices

    found = [c for c in map(greedy, UPGRADE_SETS) if c is not None]
    if not found:
        return ["full"] * (2 * g.depth)
    return min(found, key=lambda c: sum(cost[i % 2, choice][1] for i, choice in enumerate(c)))


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
        return predict_memory(with_value(config, key, units * step), device_type,
                              budget_bytes=gpu_bytes).fits(gpu_bytes)

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
    """The fixed checkpointing mode with the least recomputation whose plan fits; None when even `full` does not."""
    for mode in sorted(CHECKPOINTING_MODES, key=lambda mode: recompute_flops(config, mode)):
        if predict_memory(with_value(config, "train.checkpointing", mode), device_type).fits(gpu_bytes):
            return mode
    return None


def mode_table(config, gpu_bytes: float, what: str | None, device_type: str = "cuda") -> list[dict]:
    """Per checkpointing mode: required GiB, recompute as % of forward FLOPs, and (with `what`) the largest fit."""
    forward = model_flops(config).forward
    rows = []
    for mode in (*CHECKPOINTING_MODES, AUTO):
        moded = with_value(config, "train.checkpointing", mode)
        plan = predict_memory(moded, device_type, budget_bytes=gpu_bytes)
        recompute = auto_recompute_flops(moded, plan.choices) if mode == AUTO else recompute_flops(moded, mode)
        row = {"checkpointing": mode, "required GiB": plan.required_bytes / GIB,
               "recompute %": 100.0 * recompute / forward}
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
    plan = predict_memory(config, budget_bytes=gpu_bytes)
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
