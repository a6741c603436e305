"""Training precision, applied to a built model from outside (torchtitan-style converters).

`train.precision`:
    fp32    no autocast.
    bf16    torch.autocast(bfloat16) around the forward; master weights, grads and optimizer state stay fp32.
    fp8-te  bf16 autocast + Transformer Engine: chosen nn.Linear -> te.Linear, forward under te.fp8_autocast(recipe).
            Recipes (`train.fp8_recipe`): delayed (default), current, block (Hopper, CUDA 12.9+), mxfp8 (Blackwell).
            TE refuses delayed scaling under torch.compile (use current), and FP8 GEMMs want token counts that
            are multiples of 16.
    fp8-ao  bf16 autocast + torchao float8 training: chosen nn.Linear -> Float8Linear. Recipes: tensorwise (default),
            rowwise. Dynamic scaling keeps no global state, so there is no extra context; torch.compile is what makes
            torchao's casts fast.
Which linears go to FP8 is decided in one place, `fp8_linear_filter`. Checkpoints stay plain (`plain_state_dict`,
`load_plain_state_dict`) so bf16 and FP8 runs load each other's weights. TE's delayed-scaling history (`_extra_state`)
is not saved: after a resume it warms up again over the first steps.

Usage (engine): precision = apply_precision(model, cfg.train.precision, cfg.train.fp8_recipe); then each micro-step
`with precision.autocast(): loss = ...forward...` and the backward outside it, as TE asks.
"""
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
AO_RECIPES = ("tensorwise", "rowwise")
FP8_RECIPES = ("default", *TE_RECIPES, *AO_RECIPES)
DEFAULT_RECIPE = {"fp8-te": "delayed", "fp8-ao": "tensorwise"}

# The GPU each recipe needs (compute capability) and its family name for messages.
FP8_MIN_CAPABILITY = (8, 9)
RECIPE_MIN_CAPABILITY = {"block": ((9, 0), "Hopper (sm_90)"), "mxfp8": ((10, 0), "Blackwell (sm_100)")}

FP8_BLOCKS_PREFIX = "blocks."  # only linears inside the transformer blocks (model.blocks) go to FP8
FP8_DIM_MULTIPLE = 16          # FP8 GEMMs (TE, torch._scaled_mm) need both dims divisible by 16
FP8_MIN_DIM = 64               # below this the cast overhead outweighs the faster GEMM
# adaLN modulation linears take one row per sample (batch-sized GEMMs FP8 cannot tile) and feed adaLN-Zero gates.
FP8_EXCLUDED_NAME_PARTS = ("adaln", "modulation")

EXTRA_STATE_SUFFIX = "._extra_state"  # TE's FP8 scaling metadata in a state dict


def fp8_linear_filter(name: str, module: nn.Module) -> bool:
    """True when the module at qualified name `name` should run in FP8.

    Only nn.Linear inside the transformer blocks with both dims divisible by 16 and at least FP8_MIN_DIM; never
    embeddings, timestep/caption MLPs, adaLN modulation or the final projection (all outside `blocks.` or excluded).
    """
    if not isinstance(module, nn.Linear) or not name.startswith(FP8_BLOCKS_PREFIX):
        return False
    if any(part in name.lower() for part in FP8_EXCLUDED_NAME_PARTS):
        return False
    dims = (module.in_features, module.out_features)
    return all(d % FP8_DIM_MULTIPLE == 0 and d >= FP8_MIN_DIM for d in dims)


@dataclass
class Precision:
    """What `apply_precision` did: its name, the converted linears, and the context the forward runs in."""
    name: str
    device_type: str
    recipe: str | None = None
    converted: list[str] = field(default_factory=list)
    fp8_context: Callable[[], ContextManager] | None = None  # TE's fp8_autocast; None for every other precision

    def autocast(self) -> ContextManager:
        """Wrap the forward (not the backward) in this: nullcontext for fp32, bf16 autocast (+ FP8) otherwise."""
        return nullcontext() if self.name == "fp32" else self._mixed()

    @contextmanager
    def _mixed(self):
        with ExitStack() as stack:
            stack.enter_context(torch.autocast(device_type=self.device_type, dtype=torch.bfloat16))
            if self.fp8_context is not None:
                stack.enter_context(self.fp8_context())
            yield


def apply_precision(model: nn.Module, precision: str, fp8_recipe: str = "default") -> Precision:
    """Convert `model` in place for `precision` (fp32 | bf16 | fp8-te | fp8-ao) and return how to run it."""
    recipe = resolve_recipe(precision, fp8_recipe)
    device = next(model.parameters()).device
    result = Precision(name=precision, device_type=device.type, recipe=recipe)
    if precision == "fp8-te":
        check_fp8_device(device, precision, recipe)
        result.converted, result.fp8_context = convert_to_te(model, recipe)
    elif precision == "fp8-ao":
        check_fp8_device(device, precision, recipe)
        result.converted = convert_to_ao(model, recipe)
    logger.info("precision %s%s: %d linears in FP8%s", precision, f" ({recipe})" if recipe else "",
                len(result.converted), f": {', '.join(result.converted)}" if result.converted else "")
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


def fp8_linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the linears `fp8_linear_filter` picks, in module order."""
    return [name for name, module in model.named_modules() if fp8_linear_filter(name, module)]


def import_fp8_backend(module_name: str, precision: str, install: str):
    try:
        return importlib.import_module(module_name)
    except ImportError:
        raise ImportError(f"train.precision={precision!r} needs {module_name}: {install}") from None


def convert_to_te(model: nn.Module, recipe: str) -> tuple[list[str], Callable[[], ContextManager]]:
    """Swap the chosen nn.Linear for te.Linear (same weights); return their names and the fp8_autocast factory."""
    te = import_fp8_backend("transformer_engine.pytorch", "fp8-te", "pip install transformer-engine[pytorch]")
    te_recipe = make_te_recipe(recipe)
    names = fp8_linear_names(model)
    for name in names:
        old = model.get_submodule(name)
        new = te.Linear(old.in_features, old.out_features, bias=old.bias is not None,
                        params_dtype=old.weight.dtype, device=old.weight.device)
        with torch.no_grad():
            new.weight.copy_(old.weight)
            if old.bias is not None:
                new.bias.copy_(old.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    return names, te_autocast(te, te_recipe)


def te_autocast(te, te_recipe) -> Callable[[], ContextManager]:
    """TE's FP8 context: newer releases call it te.autocast(recipe=...) and deprecate te.fp8_autocast(fp8_recipe=...)."""
    if hasattr(te, "autocast"):
        return lambda: te.autocast(enabled=True, recipe=te_recipe)
    return lambda: te.fp8_autocast(enabled=True, fp8_recipe=te_recipe)


def make_te_recipe(recipe: str):
    """The Transformer Engine recipe object for `recipe` (TE's defaults: HYBRID format, amax history 1024)."""
    te_recipes = import_fp8_backend("transformer_engine.common.recipe", "fp8-te",
                                    "pip install transformer-engine[pytorch]")
    class_name = {"delayed": "DelayedScaling", "current": "Float8CurrentScaling", "block": "Float8BlockScaling",
                  "mxfp8": "MXFP8BlockScaling"}[recipe]
    if not hasattr(te_recipes, class_name):
        raise ImportError(f"train.fp8_recipe={recipe!r} needs a newer transformer-engine (no recipe.{class_name}): "
                          f"pip install -U transformer-engine[pytorch]")
    return getattr(te_recipes, class_name)()


def convert_to_ao(model: nn.Module, recipe: str) -> list[str]:
    """torchao convert_to_float8_training on the chosen linears; return their names."""
    float8 = import_fp8_backend("torchao.float8", "fp8-ao", "pip install torchao")
    names = fp8_linear_names(model)
    chosen = set(names)
    float8.convert_to_float8_training(model, config=float8.Float8LinearConfig.from_recipe_name(recipe),
                                      module_filter_fn=lambda module, fqn: fqn in chosen)
    return names


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
