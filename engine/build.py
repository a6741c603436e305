"""From a RunConfig to a ready model: build the plain Latte, then apply the seams from outside, in a fixed order
(torchtitan-style): kernels -> attention backend -> [pretrained weights] -> [EMA copy] -> precision (FP8
converters) -> freeze -> activation checkpointing -> compile. The EMA copy is taken before the converters so it stays
plain weights."""
import logging

import torch
from torch import nn

from ristretto.kernels.attention import attention_backend
from ristretto.model.attention import TemporalAttentionFn, attention_in_spatial_layout, attention_over_frames
from ristretto.kernels.registry import kernel_set
from ristretto.model.latte import Latte, latte_from_config

from .checkpointing import apply_activation_checkpointing
from .ema import EMA
from .precision import Precision, apply_precision, fp8_by_shape, gemm_rows
from .pretrained import apply_freeze, initialise_from_pretrained

log = logging.getLogger(__name__)


def apply_kernels(model: nn.Module, name: str) -> None:
    """Bind every module's fused ops (`kernels` attribute) to the Triton kernels or the torch reference."""
    kernels = kernel_set(name)
    for module in model.modules():
        if hasattr(module, "kernels"):
            module.kernels = kernels


def temporal_attention_backend(name: str, attention_fn) -> TemporalAttentionFn:
    """model.temporal_attention: the Triton kernel (reads q, k, v and writes its output in the spatial layout) or
    `attention_fn` on frame sequences (q, k, v copied in, the projected output copied back)."""
    if name == "triton":
        # the registered custom op (kernels/custom_ops.py): opaque to torch.compile, no graph break
        from ristretto.kernels.custom_ops import temporal_attention  # noqa: PLC0415 - Triton on demand

        return attention_in_spatial_layout(temporal_attention)
    if name == "attention_backend":
        return attention_over_frames(attention_fn)
    raise ValueError(f"model.temporal_attention: unknown {name!r}; expected 'attention_backend' or 'triton'")


def apply_attention_backend(model: nn.Module, name: str, temporal: str = "attention_backend") -> None:
    """Point every attention module at the chosen backend's attention function, and temporal attention modules at
    the chosen temporal attention."""
    attention_fn = attention_backend(name)
    temporal_fn = temporal_attention_backend(temporal, attention_fn)
    for module in model.modules():
        if hasattr(module, "attention_fn"):
            module.attention_fn = attention_fn
        if hasattr(module, "temporal_attention_fn"):
            module.temporal_attention_fn = temporal_fn


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device: cuda was asked for but no CUDA GPU is visible; use train.device=cpu or auto")
    return torch.device(name)


def latent_geometry(config) -> tuple[int, int]:
    """(channels, size) of the latents the model sees: pixels for vae=identity, else the SD VAE's 8x downsampling."""
    if config.model.vae == "identity":
        return config.model.in_channels, config.data.resolution
    return config.model.in_channels, config.data.resolution // 8


def build_plain_model(config) -> Latte:
    """The Latte model the config describes, on CPU in fp32, with the seams (kernels, attention) applied."""
    _, sample_size = latent_geometry(config)
    model = latte_from_config(config.model, config.data.frames, sample_size)
    apply_kernels(model, config.model.kernels)
    apply_attention_backend(model, config.model.attention_backend, config.model.temporal_attention)
    return model


def fp8_gemm_rows(config):
    """GEMM rows of each block linear per micro-batch (precision.gemm_rows), for the FP8 rule's pays-off part."""
    _, size = latent_geometry(config)
    tokens = config.data.frames * (size // config.model.patch_size) ** 2
    return gemm_rows(config.train.batch_size, tokens, config.model.caption_length)


def apply_residual_dtype(model: nn.Module, name: str, precision: str) -> None:
    """train.residual_dtype under mixed precision; fp32 training keeps an fp32 residual whatever it says."""
    model.residual_dtype = torch.bfloat16 if name == "bf16" and precision != "fp32" else torch.float32


def build_training_model(config, device: torch.device,
                         pretrained: bool = True) -> tuple[nn.Module, EMA | None, Precision]:
    """Model on `device` with every seam applied, its EMA (None when train.ema_decay = 0) and the precision plan.
    `pretrained`: load model.init / model.init_spatial (a resumed run skips it: its checkpoint has the weights)."""
    model = build_plain_model(config)
    if pretrained:
        initialise_from_pretrained(model, config)
    model = model.to(device)
    train = config.train
    ema = (EMA(model, train.ema_decay, train.ema_warmup, every=train.ema_every,
               device="cpu" if train.ema_on_cpu else None) if train.ema_decay > 0 else None)
    precision = apply_precision(model, train.precision, train.fp8_recipe, emulate=train.fp8_emulate,
                                rows=None if fp8_by_shape(train) else fp8_gemm_rows(config))
    apply_residual_dtype(model, train.residual_dtype, train.precision)
    apply_freeze(model, config.model.freeze)  # after the converters, which may replace parameters
    choices = None
    if train.checkpointing == "auto":  # the planner picks what each block recomputes to fit the budget
        from .plan import auto_choices, describe_choices, memory_budget_bytes, predict_memory  # noqa: PLC0415
        budget = memory_budget_bytes(config, device.type)
        choices = auto_choices(config, budget, device.type)
        log.info("checkpointing auto (budget %.2f GiB): %s", budget / 2**30, describe_choices(choices))
        if not predict_memory(config, device.type, choices=choices).fits(budget):
            log.warning("checkpointing auto: even recomputing every block is planned above train.memory_budget_gb="
                        "%.2f; lower train.batch_size, data.frames or data.resolution", budget / 2**30)
    wrapped = apply_activation_checkpointing(model, train.checkpointing, train.checkpointing_every, choices,
                                             precision.checkpoint_function())
    if wrapped:
        log.info("activation checkpointing %s: %d modules recompute in backward", train.checkpointing, wrapped)
    if train.compile:
        compile_blocks(model)
    return model, ema, precision


def compile_blocks(model: nn.Module, **options) -> None:
    """torch.compile each block with static shapes (`options` go to torch.compile, e.g. fullgraph=True in tests).
    Spatial and temporal blocks share one class (one code object for dynamo) but see different fixed shapes; without
    dynamic=False the second shape would turn the graph into a dynamic-shape one, with it each shape gets its own
    specialised graph."""
    if hasattr(torch._dynamo.config, "trace_autograd_ops"):
        # Memory-lean autograd.Functions recompute their elementwise work in backward through torch.autograd.grad;
        # dynamo traces that (instead of breaking the graph) only with this on.
        torch._dynamo.config.trace_autograd_ops = True
    for block in model.blocks:
        block.compile(dynamic=False, **options)
