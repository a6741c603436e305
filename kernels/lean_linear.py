"""Linears fused with the elementwise ops around them, keeping for backward only what the matmuls need:

    modulated_linear(x, shift, scale, linear)     linear(LN(x) * (1 + scale) + shift)
    gated_projection(residual, gate, a, linear)   residual + gate * linear(a)

Torch ops composing the kernel set's LN-modulate and gated residual with torch matmuls (no Triton kernel of their
own), like kernels/gelu_mlp.py, which is built from the same two backward pieces. Autograd on the plain composition
keeps the LN-modulate's output (the linear's input) besides x, and the projection's output (for the gate's
gradient) besides a. Here:
  - modulated_linear keeps x and recomputes the LN-modulate in backward (elementwise, no matmul);
  - gated_projection keeps a (which the attention before it keeps anyway: one storage) and gets the gate's gradient
    without the projection's output: per group g of rows sharing a gate,
        dgate_g[j] = sum_k W[j, k] * G_g[j, k] + b[j] * sum_t dout_g[t, j],   G_g = dout_g^T @ a_g,
    and the weight gradient is sum_g gate_g[j] * G_g[j, k]: the matmul FLOPs of the weight gradient alone.
Under autocast both compute in the autocast dtype, as autocast's linears do, but keep the fp32 parameters rather than
their bf16 casts (which autocast would keep alive until backward).
"""
from contextlib import nullcontext
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .lean import activation_dtype, layernorm_modulate_backward


class RowLayout(NamedTuple):
    """How a tensor [R, T, K] in another layout maps to the residual's rows [N, S, K] and back (both plain torch)."""
    to_rows: Callable[[torch.Tensor], torch.Tensor]
    from_rows: Callable[[torch.Tensor], torch.Tensor]


def tokens(t: torch.Tensor) -> torch.Tensor:
    """[..., K] -> [tokens, K]."""
    return t.reshape(-1, t.shape[-1])


def compute_context(device_type: str, dtype: torch.dtype, autocast: bool):
    """The forward's autocast, for recomputing the LN-modulate in backward exactly as the forward ran it."""
    return torch.autocast(device_type, dtype=dtype) if autocast else nullcontext()


# ------------------------------------------------------------------------------------------ backward pieces

def modulated_linear_backward(dout, x, shift, scale, weight, ops, eps: float, autocast: bool):
    """(dx, dshift, dscale, dweight, dbias) of linear(LN-modulate(x)) for dout [tokens, K_out] in the compute dtype;
    the LN-modulate is recomputed from x."""
    dtype = dout.dtype
    with compute_context(x.device.type, dtype, autocast):
        normed = ops.layernorm_modulate(x, shift, scale, eps)  # the forward's values, recomputed
    dweight, dbias = dout.t() @ tokens(normed.to(dtype)), dout.sum(0)
    dnormed = (dout @ weight.to(dtype)).view(normed.shape)
    del normed
    dx, dshift, dscale = layernorm_modulate_backward(dnormed, x, shift, scale, eps)
    return dx, dshift, dscale, dweight, dbias


GROUP_PIECES_ELEMENTS = 1 << 24  # fp32 elements of per-group weight-gradient pieces computed at once (64 MiB)


def gated_linear_backward(dout, act, gate, weight, bias, dtype: torch.dtype):
    """(dact [tokens, K] in dtype, dgate, dweight, dbias fp32) of residual + gate * linear(act), without the
    linear's output. dout [N, S, D] in the residual layout; act [tokens, K] with its rows in the same order."""
    groups = gate.shape[0]
    dout_groups = dout.reshape(groups, -1, dout.shape[-1])  # rows sharing a gate are contiguous
    act_groups = act.view(groups, -1, act.shape[-1])
    dout_sums = dout_groups.float().sum(1)  # [M, D]
    dgate = torch.empty(gate.shape, dtype=torch.float32, device=gate.device)
    dweight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    # M is the batch (adaLN vectors per sample): as many groups per batched matmul as a bounded workspace holds
    # (one call for small layers, where a loop's per-call overhead would dominate)
    chunk = max(1, GROUP_PIECES_ELEMENTS // weight.numel())
    for start in range(0, groups, chunk):
        part = slice(start, start + chunk)
        product = torch.bmm(dout_groups[part].to(dtype).transpose(1, 2), act_groups[part]).float()  # G_g [g, D, K]
        dgate[part] = (weight.float() * product).sum(-1) + bias.float() * dout_sums[part]
        dweight += (gate[part].float()[:, :, None] * product).sum(0)
        del product
    dbias = (gate.float() * dout_sums).sum(0)
    dy = tokens((dout_groups * gate[:, None, :]).to(dtype))  # the gradient reaching the linear's output
    return dy @ weight.to(dtype), dgate, dweight, dbias


# ------------------------------------------------------------------------------------------------ autograd

class ModulatedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, weight, bias, ops, eps, compute_dtype):
        normed = ops.layernorm_modulate(x, shift, scale, eps)  # in the activation dtype (autocast is on here)
        with torch.autocast(x.device.type, enabled=False):  # explicit casts, as autocast would do them
            out = F.linear(normed.to(compute_dtype), weight.to(compute_dtype), bias.to(compute_dtype))
        ctx.save_for_backward(x, shift, scale, weight)
        ctx.ops, ctx.eps, ctx.autocast = ops, eps, torch.is_autocast_enabled(x.device.type)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, shift, scale, weight = ctx.saved_tensors
        dx, dshift, dscale, dweight, dbias = modulated_linear_backward(
            tokens(dout), x, shift, scale, weight, ctx.ops, ctx.eps, ctx.autocast)
        return (dx.to(x.dtype), dshift, dscale, dweight.to(weight.dtype), dbias.to(weight.dtype), None, None, None)


class GatedProjectionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, residual, gate, a, weight, bias, ops, layout, compute_dtype):
        with torch.autocast(residual.device.type, enabled=False):
            y = F.linear(a.to(compute_dtype), weight.to(compute_dtype), bias.to(compute_dtype))
            out = ops.gate_residual(residual, gate, y if layout is None else layout.to_rows(y))  # residual's dtype
        ctx.save_for_backward(gate, a, weight, bias)
        ctx.layout, ctx.residual_dtype = layout, residual.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        gate, a, weight, bias = ctx.saved_tensors
        layout = ctx.layout
        rows = a if layout is None else layout.to_rows(a)  # a transient copy in the residual's row order
        da, dgate, dweight, dbias = gated_linear_backward(dout, tokens(rows), gate, weight, bias, a.dtype)
        del rows
        da = da.view(dout.shape[:-1] + (a.shape[-1],))
        da = da if layout is None else layout.from_rows(da)
        return (dout.to(ctx.residual_dtype), dgate.to(gate.dtype), da.reshape(a.shape), dweight.to(weight.dtype),
                dbias.to(bias.dtype), None, None, None)


# --------------------------------------------------------------------------------------------- entry points

def plain_linear(linear: nn.Module) -> bool:
    """Linears a precision backend converted (FP8: not plain nn.Linear) run as their own modules, which decide what
    they keep; the fused ops take plain ones with a bias."""
    return type(linear) is nn.Linear and linear.bias is not None


def check_rows(name: str, x: torch.Tensor, vector: torch.Tensor) -> None:
    if x.dim() != 3 or vector.dim() != 2 or x.shape[0] % vector.shape[0] or vector.shape[1] != x.shape[2]:
        raise ValueError(f"{name}: expected activations [N, S, D] and vectors [M, D] with M dividing N, got "
                         f"{tuple(x.shape)} and {tuple(vector.shape)}")


def modulated_linear(x, shift, scale, linear: nn.Module, ops, eps: float = 1e-6) -> torch.Tensor:
    """linear(LN(x) * (1 + scale) + shift), keeping x (not the LN-modulate's output) for backward. `ops` is the
    kernel set (its layernorm_modulate). x [N, S, D], shift/scale [M, D] -> [N, S, K]."""
    if not plain_linear(linear):
        return linear(ops.layernorm_modulate(x, shift, scale, eps))
    check_rows("modulated_linear", x, shift)
    return ModulatedLinearFunction.apply(x, shift, scale, linear.weight, linear.bias, ops, eps, activation_dtype(x))


def gated_projection(residual, gate, a, linear: nn.Module, ops, layout: RowLayout | None = None) -> torch.Tensor:
    """residual + gate * linear(a) in the residual's dtype, keeping a and the gate (not the projection's output).
    residual [N, S, D], gate [M, D]; a [N, S, K], or in another layout that `layout` maps to the residual's rows."""
    if not plain_linear(linear):
        y = linear(a)
        return ops.gate_residual(residual, gate, y if layout is None else layout.to_rows(y))
    check_rows("gated_projection", residual, gate)
    return GatedProjectionFunction.apply(residual, gate, a, linear.weight, linear.bias, ops, layout,
                                         activation_dtype(a))
