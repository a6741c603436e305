"""A CPU stand-in for the parts of Transformer Engine's PyTorch API that Ristretto relies on, faithful where it matters:

- `Linear` runs FP8 (values rounded through float8_e4m3fn forward, float8_e5m2 for the output gradient) only inside
  `fp8_autocast` / `autocast`; outside it runs in high precision and saves different tensors, so a plain
  torch.utils.checkpoint whose recompute runs outside the FP8 context fails with CheckpointError, as with TE.
- Delayed scaling keeps per-module state in `fp8_meta["scaling_fwd"|"scaling_bwd"]` (.scale, .amax_history), created
  lazily on the first FP8 forward (`init_fp8_metadata`), recorded on every forward/backward and turned into new scales
  when the outermost autocast exits, after a MAX all-reduce of the amaxes over the autocast's group (TE's
  fp8_group / amax_reduction_group). `get_extra_state` pickles it into a uint8 tensor, as TE does.
- `distributed.checkpoint` re-enters the FP8 context in recompute and uses the scales of the original forward (TE's
  activation-recompute phase), so a recomputed forward equals the first one.
- `is_first_microbatch`: True/None cast the weight (counted in `weight_casts`), False reuses the cached FP8 weight.
  Reusing it after the weight changed is TE's silent bug; the stand-in raises instead, so a test catches it.
- Recipes: DelayedScaling (stateful), Float8CurrentScaling / Float8BlockScaling / MXFP8BlockScaling (stateless:
  scales from each tensor's own amax).
`install(monkeypatch)` puts it in sys.modules under transformer_engine.pytorch and transformer_engine.common.recipe.
"""
import contextlib
import pickle
import sys
import types
from collections import deque

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

E4M3_MAX, E5M2_MAX = 448.0, 57344.0


# ---- recipes ----

class DelayedScaling:
    def __init__(self, amax_history_len: int = 16, margin: int = 0):
        self.amax_history_len, self.margin = amax_history_len, margin

    def delayed(self):
        return True


class _StatelessRecipe:
    def delayed(self):
        return False


Float8CurrentScaling = type("Float8CurrentScaling", (_StatelessRecipe,), {})
Float8BlockScaling = type("Float8BlockScaling", (_StatelessRecipe,), {})
MXFP8BlockScaling = type("MXFP8BlockScaling", (_StatelessRecipe,), {})


# ---- global FP8 state (TE's FP8GlobalStateManager) ----

class _GlobalState:
    def __init__(self):
        self.enabled, self.recipe, self.group = False, None, None
        self.recompute = False         # inside distributed.checkpoint's recompute
        self.checkpoint_forward = 0    # inside distributed.checkpoint's first forward
        self.used: list["Linear"] = []  # delayed-scaling modules that ran since the outermost autocast entered
        self.entered: list[tuple] = []  # (enabled, recipe, group) of each outermost autocast, for tests


STATE = _GlobalState()


@contextlib.contextmanager
def _fp8_region(enabled, recipe, group):
    saved = (STATE.enabled, STATE.recipe, STATE.group)
    outermost = not STATE.enabled
    if outermost and not STATE.recompute:
        STATE.entered.append((enabled, recipe, group))
    STATE.enabled, STATE.recipe, STATE.group = enabled, recipe if recipe is not None else DelayedScaling(), group
    try:
        yield
    finally:
        if outermost and enabled and not STATE.recompute:
            _reduce_and_update(STATE.used, STATE.group)
            STATE.used = []
        STATE.enabled, STATE.recipe, STATE.group = saved


def fp8_autocast(enabled=True, calibrating=False, fp8_recipe=None, fp8_group=None, _graph=False):
    return _fp8_region(enabled, fp8_recipe, fp8_group)


def _reduce_and_update(modules, group):
    """New scales from the amax history of every module that ran: max over the group's ranks, then over history."""
    for module in dict.fromkeys(modules):
        for key, fp8_max in (("scaling_fwd", E4M3_MAX), ("scaling_bwd", E5M2_MAX)):
            meta = module.fp8_meta[key]
            if group is not None and dist.is_initialized():
                dist.all_reduce(meta.amax_history[0], op=dist.ReduceOp.MAX, group=group)
            amax = meta.amax_history.max(dim=0).values
            margin = 2.0 ** module.fp8_meta["recipe"].margin
            meta.scale.copy_(torch.where(amax > 0, fp8_max / amax / margin, meta.scale))
            meta.amax_history.copy_(torch.roll(meta.amax_history, -1, dims=0))
            meta.amax_history[0].zero_()


# ---- TE's checkpoint ----

class _Distributed(types.ModuleType):
    calls = 0

    @staticmethod
    def checkpoint(function, *args, use_reentrant=True, **kwargs):
        if use_reentrant:
            raise NotImplementedError("stand-in: only use_reentrant=False")
        _Distributed.calls += 1
        fp8, recipe, group = STATE.enabled, STATE.recipe, STATE.group

        @contextlib.contextmanager
        def first_forward():
            STATE.checkpoint_forward += 1
            try:
                yield
            finally:
                STATE.checkpoint_forward -= 1

        @contextlib.contextmanager
        def recompute():
            STATE.recompute = True
            try:
                with _fp8_region(fp8, recipe, group):
                    yield
            finally:
                STATE.recompute = False

        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False,
                                                 context_fn=lambda: (first_forward(), recompute()), **kwargs)


# ---- Linear ----

class _ScalingMeta:
    def __init__(self, history: int, tensors: int):
        self.scale = torch.ones(tensors)
        self.amax_history = torch.zeros(history, tensors)


def _quantise(x: torch.Tensor, scale: torch.Tensor, dtype, fp8_max: float) -> torch.Tensor:
    return (x.float() * scale).clamp(-fp8_max, fp8_max).to(dtype)


class _FP8Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inp, weight, bias, weight_fp8, weight_scale, input_scale, grad_scale, module, out_dtype):
        input_fp8 = _quantise(inp, input_scale, torch.float8_e4m3fn, E4M3_MAX)
        ctx.save_for_backward(input_fp8, input_scale, weight_fp8, weight_scale, grad_scale)
        ctx.module, ctx.inp_dtype, ctx.has_bias = module, inp.dtype, bias is not None
        with torch.autocast("cpu", enabled=False):
            out = (input_fp8.float() / input_scale) @ (weight_fp8.float() / weight_scale).t()
            if bias is not None:
                out = out + bias.float()
        return out.to(out_dtype)

    @staticmethod
    def backward(ctx, grad):
        input_fp8, input_scale, weight_fp8, weight_scale, grad_scale = ctx.saved_tensors
        if isinstance(ctx.module.fp8_meta.get("scaling_bwd"), _ScalingMeta):
            history = ctx.module.fp8_meta["scaling_bwd"].amax_history
            history[0, 0] = torch.maximum(history[0, 0], grad.detach().abs().max().float())
        else:
            grad_scale = E5M2_MAX / grad.detach().abs().max().float().clamp(min=1e-12)
        with torch.autocast("cpu", enabled=False):
            g = _quantise(grad, grad_scale, torch.float8_e5m2, E5M2_MAX).float() / grad_scale
            grad_input = g @ (weight_fp8.float() / weight_scale)
            grad_weight = g.reshape(-1, g.shape[-1]).t() @ (input_fp8.float() / input_scale).reshape(-1, input_fp8.shape[-1])
            grad_bias = g.reshape(-1, g.shape[-1]).sum(0) if ctx.has_bias else None
        return grad_input.to(ctx.inp_dtype), grad_weight, grad_bias, None, None, None, None, None, None


class Linear(nn.Linear):
    def __init__(self, in_features, out_features, bias=True, params_dtype=None, device=None):
        super().__init__(in_features, out_features, bias=bias, dtype=params_dtype, device=device)
        self.fp8_meta = {"fp8_checkpoint": False, "fp8_group": None}
        self.fp8_meta_tensors_initialized = False
        self.weight_casts = 0
        self._weight_cache = None           # (fp8 weight, scale, weight._version)
        self._recompute_scales = deque()    # scales of checkpointed forwards, for their recompute

    # TE's metadata API
    def init_fp8_meta_tensors(self, recipe) -> None:
        if self.fp8_meta_tensors_initialized or not recipe.delayed():
            return
        self.fp8_meta["scaling_fwd"] = _ScalingMeta(recipe.amax_history_len, 3 * self.fp8_meta.get("num_gemms", 1))
        self.fp8_meta["scaling_bwd"] = _ScalingMeta(recipe.amax_history_len, 2 * self.fp8_meta.get("num_gemms", 1))
        self.fp8_meta_tensors_initialized = True

    def init_fp8_metadata(self, num_gemms: int = 1) -> None:
        self.fp8_meta["num_gemms"], self.fp8_meta["recipe"] = num_gemms, STATE.recipe
        self.fp8_meta["fp8_checkpoint"], self.fp8_meta["fp8_group"] = True, STATE.group
        self.init_fp8_meta_tensors(STATE.recipe)

    def get_fp8_meta_tensors(self):
        if "scaling_fwd" not in self.fp8_meta:
            return None
        return {key: [self.fp8_meta[key].scale.clone(), self.fp8_meta[key].amax_history.clone()]
                for key in ("scaling_fwd", "scaling_bwd")}

    def reset_fp8_meta_tensors(self, fp8_meta_tensors=None) -> None:
        with torch.no_grad():
            for key in ("scaling_fwd", "scaling_bwd"):
                if key in self.fp8_meta:
                    self.fp8_meta[key].scale.copy_(fp8_meta_tensors[key][0])
                    self.fp8_meta[key].amax_history.copy_(fp8_meta_tensors[key][1])

    def get_extra_state(self):  # TE: pickle in a uint8 tensor
        if "scaling_fwd" not in self.fp8_meta:
            return torch.empty(0, dtype=torch.uint8)
        state = {"scale_fwd": self.fp8_meta["scaling_fwd"].scale, "amax_history_fwd":
                 self.fp8_meta["scaling_fwd"].amax_history}
        return torch.frombuffer(bytearray(pickle.dumps(state)), dtype=torch.uint8)

    def set_extra_state(self, state):
        if state is not None and state.numel():
            pickle.loads(state.numpy().tobytes())

    def forward(self, inp, is_first_microbatch=None):
        if not STATE.enabled:
            return F.linear(inp, self.weight, self.bias)  # high precision: saves the bf16/fp32 input and weight
        self.init_fp8_metadata()
        recipe = STATE.recipe
        out_dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else inp.dtype
        if recipe.delayed():
            fwd, bwd = self.fp8_meta["scaling_fwd"], self.fp8_meta["scaling_bwd"]
            if STATE.recompute:
                scales = self._recompute_scales.popleft()
            else:
                scales = (fwd.scale.clone(), bwd.scale.clone())
                if STATE.checkpoint_forward:
                    self._recompute_scales.append(scales)
                STATE.used.append(self)
                with torch.no_grad():
                    fwd.amax_history[0, 0] = torch.maximum(fwd.amax_history[0, 0], inp.detach().abs().max().float())
            input_scale, weight_scale, grad_scale = scales[0][0], scales[0][1], scales[1][0]
        else:
            input_scale = E4M3_MAX / inp.detach().abs().max().float().clamp(min=1e-12)
            weight_scale = E4M3_MAX / self.weight.detach().abs().max().float().clamp(min=1e-12)
            grad_scale = torch.ones(())
        weight_fp8, weight_scale = self._fp8_weight(weight_scale, is_first_microbatch, recipe)
        return _FP8Matmul.apply(inp, self.weight, self.bias, weight_fp8, weight_scale, input_scale, grad_scale, self,
                                out_dtype)

    def _fp8_weight(self, scale, is_first_microbatch, recipe):
        if is_first_microbatch is False:
            if self._weight_cache is None or self._weight_cache[2] != self.weight._version:
                raise RuntimeError("stand-in TE: is_first_microbatch=False but the weight changed since it was cast "
                                   "(TE would silently reuse the stale FP8 weight)")
            return self._weight_cache[:2]
        if recipe.delayed() and not STATE.recompute:
            history = self.fp8_meta["scaling_fwd"].amax_history
            with torch.no_grad():
                history[0, 1] = torch.maximum(history[0, 1], self.weight.detach().abs().max().float())
        if not STATE.recompute:
            self.weight_casts += 1
        weight_fp8 = _quantise(self.weight.detach(), scale, torch.float8_e4m3fn, E4M3_MAX)
        self._weight_cache = (weight_fp8, scale, self.weight._version)
        return weight_fp8, scale


# ---- installing it ----

def reset() -> None:
    STATE.__init__()
    _Distributed.calls = 0


def build_modules(with_new_autocast: bool = False) -> dict[str, types.ModuleType]:
    recipe = types.ModuleType("transformer_engine.common.recipe")
    for cls in (DelayedScaling, Float8CurrentScaling, Float8BlockScaling, MXFP8BlockScaling):
        setattr(recipe, cls.__name__, cls)
    te = types.ModuleType("transformer_engine.pytorch")
    te.Linear, te.fp8_autocast, te.distributed, te.STATE = Linear, fp8_autocast, _Distributed("distributed"), STATE
    te.checkpoint = te.distributed.checkpoint  # TE exports it at the top level too
    if with_new_autocast:
        te.autocast = lambda enabled=True, calibrating=False, recipe=None, amax_reduction_group=None, _graph=False: \
            _fp8_region(enabled, recipe, amax_reduction_group)
    return {"transformer_engine": types.ModuleType("transformer_engine"), "transformer_engine.pytorch": te,
            "transformer_engine.pytorch.distributed": te.distributed,
            "transformer_engine.common": types.ModuleType("transformer_engine.common"),
            "transformer_engine.common.recipe": recipe}


def install(monkeypatch=None, with_new_autocast: bool = False) -> types.ModuleType:
    """Put the stand-in in sys.modules (through monkeypatch when given, so it is undone after the test)."""
    reset()
    modules = build_modules(with_new_autocast)
    for name, module in modules.items():
        if monkeypatch is not None:
            monkeypatch.setitem(sys.modules, name, module)
        else:
            sys.modules[name] = module
    return modules["transformer_engine.pytorch"]
