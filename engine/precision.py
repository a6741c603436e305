"""Training precision, applied to a built model from outside (torchtitan-style converters).

`train.precision`:
    fp32    no autocast.
    bf16    torch.autocast(bfloat16) around the forward; master weights, grads and optimizer state stay fp32.
    fp8-te  bf16 autocast + Transformer Engine: chosen nn.Linear -> te.Linear, forward under TE's autocast(recipe,
            amax reduction group). Recipes (`train.fp8_recipe`): delayed (default; DelayedScaling), current
            (Float8CurrentScaling, tensorwise), block (Float8BlockScaling, 1x128 / 128x128 blocks, Hopper),
            mxfp8 (Blackwell); a recipe the installed TE lacks is an error naming it. TE refuses delayed scaling
            under torch.compile (use current).
    fp8-ao  bf16 autocast + torchao float8 training: chosen nn.Linear -> Float8Linear. Recipes: tensorwise (default),
            rowwise, rowwise_with_gw_hp (rowwise, but the weight gradient GEMM in bf16). Needs train.compile=true (eager casts make it slower than bf16; engine/config.validate), except
            train.fp8_emulate=true (torchao's emulation, CPU-capable, for numerics checks).
Which linears go to FP8 is decided by one rule, `fp8_linear_filter` (shape + pays-off; logged at start and by the
planner). What each part of fp8-te needs from the engine:
    activation checkpointing  recompute through TE's checkpoint (`Precision.checkpoint_function`), which re-enters
                              the FP8 context with the forward's scales; torch's would recompute outside it.
    accumulation              `with precision.microbatch(i):` around each micro-batch: is_first_microbatch.
    data parallel             `precision.fp8_group` (engine/distributed.amax_reduction_group): one amax for all ranks.
    checkpoints               weights stay plain (`plain_state_dict`), so bf16 and FP8 runs load each other's; TE's
                              delayed-scaling state goes beside them as tensors (`fp8_scaling_state`, restored by
                              `load_fp8_scaling_state`), never as TE's pickled `_extra_state`.

Usage (engine): precision = apply_precision(model, ...); then each micro-step
`with precision.autocast(): loss = ...forward...` and the backward outside it, as TE asks.
"""
import dataclasses
import importlib
import logging
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch
from torch import nn

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp8-te", "fp8-ao")
TE_RECIPES = ("delayed", "current", "block", "mxfp8")
AO_RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
FP8_RECIPES = ("default", *TE_RECIPES, *AO_RECIPES)
DEFAULT_RECIPE = {"fp8-te": "delayed", "fp8-ao": "tensorwise"}

# The GPU each recipe needs (compute capability) and its family name for messages.
FP8_MIN_CAPABILITY = (8, 9)
RECIPE_MIN_CAPABILITY = {"block": ((9, 0), "Hopper (sm_90)"), "mxfp8": ((10, 0), "Blackwell (sm_100)")}

FP8_BLOCKS_PREFIX = "blocks."  # only linears inside the transformer blocks (model.blocks) go to FP8
FP8_DIM_MULTIPLE = 16          # FP8 GEMMs (TE, torch._scaled_mm) need both dims divisible by 16
# The FP8 rule's pays-off threshold, in FLOP per byte of the bf16 GEMM [M, K] x [K, N]: M*K*N / (M*K + K*N + M*N)
# (2*M*K*N FLOP over 2-byte reads of both operands and the write of the output). Below H100's bf16 ridge point
# (989 TFLOP/s / 3.35 TB/s = 295; H200: 206) the bf16 GEMM is memory-bound, so FP8's 2x tensor-core rate saves nothing
# while the amax + cast passes add memory traffic. Latte-1 (1152 wide, 16 x 1024 tokens per sample) sits at 556-873;
# cross-attention K/V over 120 caption rows at 104, and every linear of a 64-wide CPU model at <= 50 (docs/precision.md).
FP8_MIN_INTENSITY = 300
# adaLN modulation linears take one row per sample (batch-sized GEMMs FP8 cannot tile) and feed adaLN-Zero gates.
FP8_EXCLUDED_NAME_PARTS = ("adaln", "modulation")
CAPTION_ROW_LINEARS = ("cross_attn.kv",)  # linears whose rows are caption tokens, not video tokens

EXTRA_STATE_SUFFIX = "._extra_state"  # TE's FP8 scaling metadata in a state dict (pickled by TE: never saved here)
FP8_STATE_KEYS = ("scaling_fwd", "scaling_bwd")  # TE delayed scaling's per-module state: .scale and .amax_history


def gemm_intensity(rows: int, in_features: int, out_features: int) -> float:
    """FLOP per byte of the bf16 GEMM [rows, in] x [in, out] (operands read once, output written once)."""
    m, k, n = rows, in_features, out_features
    return m * k * n / (m * k + k * n + m * n)


def fp8_linear_filter(name: str, module: nn.Module, rows: int | None = None) -> bool:
    """True when the module at qualified name `name` should run in FP8 (the one FP8 rule, see `fp8_rule_text`).

    Only nn.Linear inside the transformer blocks, never adaLN modulation (nor embeddings, timestep/caption MLPs, the
    final projection: all outside `blocks.`), with both dims divisible by 16 and, when `rows` (the GEMM's M per
    micro-batch) is known, a bf16 GEMM intensity of at least FP8_MIN_INTENSITY. rows=None (tests, emulated FP8)
    applies the shape part only.
    """
    if not isinstance(module, nn.Linear) or not name.startswith(FP8_BLOCKS_PREFIX):
        return False
    if any(part in name.lower() for part in FP8_EXCLUDED_NAME_PARTS):
        return False
    return fp8_shape_pays_off(module.in_features, module.out_features, rows)


def fp8_shape_pays_off(in_features: int, out_features: int, rows: int | None) -> bool:
    """The shape part of the FP8 rule: both dims divisible by 16 and (rows known) intensity >= FP8_MIN_INTENSITY."""
    if in_features % FP8_DIM_MULTIPLE or out_features % FP8_DIM_MULTIPLE:
        return False
    return rows is None or gemm_intensity(rows, in_features, out_features) >= FP8_MIN_INTENSITY


def fp8_by_shape(train) -> bool:
    """Whether a run's FP8 linears are chosen by the shape part of the rule alone: train.fp8_linears=shape, or
    emulation (no FP8 GEMM to pay for)."""
    return train.fp8_linears == "shape" or train.fp8_emulate


def fp8_rule_text() -> str:
    return (f"FP8 rule: block linears (not adaLN) with both dims divisible by {FP8_DIM_MULTIPLE} and a bf16 GEMM "
            f"intensity M*K*N/(M*K+K*N+M*N) >= {FP8_MIN_INTENSITY} FLOP/byte (compute-bound, so FP8 pays for its casts)")


def gemm_rows(batch_size: int, tokens_per_sample: int, caption_length: int) -> Callable[[str], int]:
    """The GEMM row count of the linear named `name`, per micro-batch: caption tokens for cross-attention K/V, video
    tokens for every other block linear (spatial and temporal blocks see the same tokens, reshaped)."""
    def rows(name: str) -> int:
        if name.endswith(CAPTION_ROW_LINEARS):
            return batch_size * caption_length
        return batch_size * tokens_per_sample
    return rows


@dataclass
class Precision:
    """What `apply_precision` did: its name, the converted linears, and the context the forward runs in."""
    name: str
    device_type: str
    recipe: str | None = None
    converted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # block linears the rule kept in bf16 (FP8 would not pay)
    fp8_context: Callable[[object], ContextManager] | None = None  # TE's autocast(group); None for other precisions
    te_checkpoint: Callable | None = None  # TE's checkpoint: its recompute re-enters the FP8 context (fp8-te only)
    te_recipe: object | None = None
    fp8_group: object | None = None  # amax reduction group under DDP/FSDP (engine/distributed.amax_reduction_group)
    first_microbatch: bool | None = None  # passed to te.Linear as is_first_microbatch (None outside accumulation)

    def autocast(self) -> ContextManager:
        """Wrap the forward (not the backward) in this: nullcontext for fp32, bf16 autocast (+ FP8) otherwise."""
        return nullcontext() if self.name == "fp32" else self._mixed()

    @contextmanager
    def _mixed(self):
        with ExitStack() as stack:
            stack.enter_context(torch.autocast(device_type=self.device_type, dtype=torch.bfloat16))
            if self.fp8_context is not None:
                stack.enter_context(self.fp8_context(self.fp8_group))
            yield

    @contextmanager
    def microbatch(self, index: int):
        """Around micro-batch `index`'s forward and backward: TE casts the weights to FP8 on micro-batch 0 only and
        reuses them on the others (the weights do not change within an optimizer step). Reset to None afterwards,
        so nothing after the optimizer step (validation, the next step) can reuse a stale FP8 weight."""
        self.first_microbatch = index == 0
        try:
            yield
        finally:
            self.first_microbatch = None

    def checkpoint_function(self) -> Callable | None:
        """What activation checkpointing should recompute with: TE's checkpoint for fp8-te (torch's recompute would run
        outside the FP8 context and fail), None (torch.utils.checkpoint) otherwise."""
        return self.te_checkpoint


def apply_precision(model: nn.Module, precision: str, fp8_recipe: str = "default", emulate: bool = False,
                    rows: Callable[[str], int] | None = None) -> Precision:
    """Convert `model` in place for `precision` (fp32 | bf16 | fp8-te | fp8-ao) and return how to run it.

    `emulate` (fp8-ao only): torchao's emulated float8, which runs on any device (numerics checks, no speed-up).
    `rows`: the GEMM row count of a linear by name (`gemm_rows`), for the FP8 rule's pays-off part; None applies the
    shape part only (so does `emulate`: there is no FP8 GEMM to pay for)."""
    recipe = resolve_recipe(precision, fp8_recipe)
    device = next(model.parameters()).device
    result = Precision(name=precision, device_type=device.type, recipe=recipe)
    if precision in DEFAULT_RECIPE:
        if not emulate:
            check_fp8_device(device, precision, recipe)
        names = fp8_linear_names(model, None if emulate else rows)
        result.skipped = [name for name in fp8_linear_names(model) if name not in names]
        if precision == "fp8-te":
            convert_to_te(model, recipe, names, result)
        else:
            convert_to_ao(model, recipe, names, emulate)
        result.converted = names
        logger.info("precision %s (%s%s): %d linears in FP8%s; %d kept in bf16%s. %s", precision, recipe,
                    ", emulated" if emulate else "", len(names), f": {', '.join(names)}" if names else "",
                    len(result.skipped), f": {', '.join(result.skipped)}" if result.skipped else "",
                    fp8_rule_text() if rows is not None and not emulate else
                    f"{'Emulated' if emulate else 'Converted by shape'}: the shape part of the FP8 rule only.")
    else:
        logger.info("precision %s", precision)
    return result


def resolve_recipe(precision: str, fp8_recipe: str) -> str | None:
    """The concrete recipe for `precision` ('default' picks the backend's), or a one-line error naming the field."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision: unknown precision {precision!r}; expected one of {PRECISIONS}")
    if fp8_recipe not in FP8_RECIPES:
        raise ValueError(f"train.fp8_recipe: unknown recipe {fp8_recipe!r}; expected one of {FP8_RECIPES}")
    if precision not in DEFAULT_RECIPE:
        return None  # fp32/bf16 ignore the recipe
    choices = TE_RECIPES if precision == "fp8-te" else AO_RECIPES
    recipe = DEFAULT_RECIPE[precision] if fp8_recipe == "default" else fp8_recipe
    if recipe not in choices:
        raise ValueError(f"train.fp8_recipe: {recipe!r} is not a recipe of train.precision={precision!r}; "
                         f"expected one of {('default', *choices)}")
    return recipe


def check_fp8_device(device: torch.device, precision: str, recipe: str) -> None:
    """FP8 matmuls need an sm_89+ GPU (block scaling sm_90+, MXFP8 sm_100+); one line naming bf16 otherwise."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    found = "sm_%d%d" % capability if capability else f"no CUDA device (model on {device.type})"
    if capability is None or capability < FP8_MIN_CAPABILITY:
        raise RuntimeError(f"train.precision={precision!r}: FP8 needs an Ada/Hopper GPU (sm_89+), found {found}; "
                           f"use train.precision='bf16'")
    needed, family = RECIPE_MIN_CAPABILITY.get(recipe, (FP8_MIN_CAPABILITY, ""))
    if capability < needed:
        raise RuntimeError(f"train.fp8_recipe={recipe!r} needs a {family} GPU, found {found}; "
                           f"use train.fp8_recipe='delayed' or 'current', or train.precision='bf16'")


def fp8_linear_names(model: nn.Module, rows: Callable[[str], int] | None = None) -> list[str]:
    """Qualified names of the linears `fp8_linear_filter` picks, in module order."""
    return [name for name, module in model.named_modules()
            if fp8_linear_filter(name, module, rows(name) if rows is not None else None)]


# train.precision -> (the package it needs, how to install it): the one table for the start-up check and the imports.
FP8_BACKENDS = {"fp8-te": ("transformer_engine", "pip install transformer-engine[pytorch]"),
                "fp8-ao": ("torchao", "pip install torchao")}


def import_fp8_backend(module_name: str, precision: str):
    try:
        return importlib.import_module(module_name)
    except ImportError:
        install = FP8_BACKENDS[precision][1]
        raise ImportError(f"train.precision={precision!r} needs {module_name}: {install}") from None


def convert_to_te(model: nn.Module, recipe: str, names: list[str], precision: Precision) -> None:
    """Swap the named nn.Linear for te.Linear (same weights), each called with is_first_microbatch from
    `precision`; set precision's FP8 context, TE recipe and TE checkpoint (for activation checkpointing)."""
    te = import_fp8_backend("transformer_engine.pytorch", "fp8-te")
    te_recipe = make_te_recipe(recipe)
    for name in names:
        old = model.get_submodule(name)
        new = te.Linear(old.in_features, old.out_features, bias=old.bias is not None,
                        params_dtype=old.weight.dtype, device=old.weight.device)
        with torch.no_grad():
            new.weight.copy_(old.weight)
            if old.bias is not None:
                new.bias.copy_(old.bias)
        pass_first_microbatch(new, precision)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    precision.fp8_context, precision.te_recipe = te_autocast(te, te_recipe), te_recipe
    precision.te_checkpoint = te_checkpoint(te)


def pass_first_microbatch(linear: nn.Module, precision: Precision) -> None:
    """Call `linear` (a te.Linear) with is_first_microbatch=precision.first_microbatch: the model calls linear(x)."""
    forward = linear.forward
    linear.forward = lambda inp: forward(inp, is_first_microbatch=precision.first_microbatch)


def te_checkpoint(te) -> Callable:
    """TE's activation checkpoint (te.checkpoint = te.distributed.checkpoint), non-reentrant: its recompute re-enters
    the FP8 context with the forward's recipe, group and (delayed scaling) scales, so recomputed activations equal the
    forward's."""
    checkpoint = te.checkpoint
    return lambda function, *args, **kwargs: checkpoint(function, *args, use_reentrant=False, **kwargs)


def te_autocast(te, te_recipe) -> Callable[[object], ContextManager]:
    """TE's FP8 context for an amax reduction group (None: this process only). Newer releases call it
    te.autocast(recipe=..., amax_reduction_group=...) and deprecate te.fp8_autocast(fp8_recipe=..., fp8_group=...)."""
    if hasattr(te, "autocast"):
        return lambda group: te.autocast(enabled=True, recipe=te_recipe, amax_reduction_group=group)
    return lambda group: te.fp8_autocast(enabled=True, fp8_recipe=te_recipe, fp8_group=group)


def make_te_recipe(recipe: str):
    """The Transformer Engine recipe object for `recipe` (TE's defaults: HYBRID format, amax history 1024)."""
    te_recipes = import_fp8_backend("transformer_engine.common.recipe", "fp8-te")
    class_name = {"delayed": "DelayedScaling", "current": "Float8CurrentScaling", "block": "Float8BlockScaling",
                  "mxfp8": "MXFP8BlockScaling"}[recipe]
    if not hasattr(te_recipes, class_name):
        raise ImportError(f"train.fp8_recipe={recipe!r} needs a newer transformer-engine (no recipe.{class_name}): "
                          f"pip install -U transformer-engine[pytorch]")
    return getattr(te_recipes, class_name)()


def convert_to_ao(model: nn.Module, recipe: str, names: list[str], emulate: bool = False) -> None:
    """torchao convert_to_float8_training on the named linears (emulate: torchao's CPU-capable emulation)."""
    float8 = import_fp8_backend("torchao.float8", "fp8-ao")
    chosen = set(names)
    config = dataclasses.replace(float8.Float8LinearConfig.from_recipe_name(recipe), emulate=emulate)
    float8.convert_to_float8_training(model, config=config, module_filter_fn=lambda module, fqn: fqn in chosen)


# ---- checkpoints stay plain: the same keys and tensors whatever the precision ----

def plain_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` as a plain torch.Tensor: unwraps torchao's FSDP float8 weight wrapper and TE's Float8Tensor."""
    if type(tensor) in (torch.Tensor, nn.Parameter):
        return tensor
    if hasattr(tensor, "_tensor"):        # torchao WeightWithDynamicFloat8CastTensor keeps the hp weight here
        return plain_tensor(tensor._tensor)
    if hasattr(tensor, "dequantize"):     # TE Float8Tensor (fp8 parameters)
        return tensor.dequantize()
    return tensor


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as the unconverted model would have it (no TE `_extra_state`, plain tensors)."""
    return {key: plain_tensor(value) for key, value in model.state_dict().items()
            if not key.endswith(EXTRA_STATE_SUFFIX)}


def load_plain_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a plain (or TE) state dict into a converted or unconverted model; any other mismatch is an error."""
    state = {key: value for key, value in state.items() if not key.endswith(EXTRA_STATE_SUFFIX)}
    result = model.load_state_dict(state, strict=False)
    missing = [key for key in result.missing_keys if not key.endswith(EXTRA_STATE_SUFFIX)]
    if missing or result.unexpected_keys:
        raise KeyError(f"checkpoint does not match the model: missing {missing[:5]}, "
                       f"unexpected {result.unexpected_keys[:5]}")


@contextmanager
def ignoring_te_extra_state(model: nn.Module):
    """Inside: TE modules ignore set_extra_state. torch's set_model_state_dict(full_state_dict=True) hands every module
    that defines get_extra_state a placeholder object (torch.distributed.checkpoint.state_dict._EXTRA_STATE), which
    TE's set_extra_state rejects ("Unsupported checkpoint format"); the FP8 state comes back through
    load_fp8_scaling_state instead."""
    patched = [module for module in model.modules() if hasattr(module, "fp8_meta")]
    for module in patched:
        module.set_extra_state = lambda state: None
    try:
        yield
    finally:
        for module in patched:
            del module.set_extra_state


# ---- TE delayed-scaling state in checkpoints: plain tensors (safetensors), never TE's pickled _extra_state ----

def fp8_scaling_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """TE delayed scaling's per-module state as `<module>.<scaling_fwd|scaling_bwd>.<scale|amax_history>` CPU tensors;
    {} when no module keeps any (bf16, fp8-ao, stateless TE recipes, or before the first FP8 forward)."""
    state = {}
    for name, module in model.named_modules():
        meta = getattr(module, "fp8_meta", None)
        if not meta or not all(hasattr(meta.get(key), "amax_history") for key in FP8_STATE_KEYS):
            continue
        for key in FP8_STATE_KEYS:
            state[f"{name}.{key}.scale"] = meta[key].scale.detach().cpu().clone()
            state[f"{name}.{key}.amax_history"] = meta[key].amax_history.detach().cpu().clone()
    return state


def load_fp8_scaling_state(model: nn.Module, state: dict[str, torch.Tensor], te_recipe) -> int:
    """Restore `fp8_scaling_state` output into the TE modules of `model` (allocating their FP8 metadata the way TE's
    set_extra_state does); returns how many modules were restored. A key that names no TE module is an error."""
    modules = {}
    for key in state:
        module_name = key.rsplit(".", 2)[0]
        modules.setdefault(module_name, None)
    for module_name in modules:
        module = model.get_submodule(module_name) if module_name else model
        if not hasattr(module, "init_fp8_meta_tensors"):
            raise KeyError(f"FP8 scaling state names {module_name!r}, which is not a Transformer Engine module here "
                           f"(was the checkpoint written with another train.precision or model?)")
        module.fp8_meta.setdefault("num_gemms", 1)
        module.fp8_meta["recipe"] = te_recipe
        module.init_fp8_meta_tensors(te_recipe)
        device = module.weight.device
        module.reset_fp8_meta_tensors({key: [state[f"{module_name}.{key}.scale"].to(device),
                                             state[f"{module_name}.{key}.amax_history"].to(device)]
                                       for key in FP8_STATE_KEYS})
    return len(modules)
