"""The block's MLP branch in one op: residual + gate * fc2(GELU_tanh(fc1(LN-modulate(residual)))), keeping for
backward the residual and the GELU input only (a torch op composing the kernel set's ops with torch matmuls; no
Triton kernel of its own).

Autograd on the plain composition keeps the normalised input (fc1's input), the GELU input, the GELU output (fc2's
input) and fc2's output (for the gate's gradient). This Function recomputes the LN-modulate and the GELU in backward
(elementwise, no matmul) and gets the gate's gradient without fc2's output, from per-group pieces of fc2's weight
gradient (the backward pieces of kernels/lean_linear.py, which the attention branch uses too).
Under autocast it computes in the autocast dtype, as autocast's linears do, but keeps the fp32 parameters rather
than their bf16 casts (autocast keeps 2 bytes per weight of every linear alive until backward).
"""
import torch
import torch.nn.functional as F
from torch import nn

from .lean import activation_dtype
from .lean_linear import gated_linear_backward, modulated_linear_backward, tokens


class GatedMlpFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, gate, w1, b1, w2, b2, ops, eps, compute_dtype):
        device = x.device.type
        normed = ops.layernorm_modulate(x, shift, scale, eps)  # in the activation dtype (autocast is on here)
        with torch.autocast(device, enabled=False):  # explicit casts below, as autocast would do them
            hidden = F.linear(normed.to(compute_dtype), w1.to(compute_dtype), b1.to(compute_dtype))
            y = F.linear(F.gelu(hidden, approximate="tanh"), w2.to(compute_dtype), b2.to(compute_dtype))
            out = ops.gate_residual(x, gate, y)  # in the residual's dtype
        ctx.save_for_backward(x, shift, scale, gate, hidden, w1, w2, b2)
        ctx.ops, ctx.eps, ctx.autocast = ops, eps, torch.is_autocast_enabled(device)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, shift, scale, gate, hidden, w1, w2, b2 = ctx.saved_tensors
        act = tokens(F.gelu(hidden, approximate="tanh"))  # recomputed
        dact, dgate, dw2, db2 = gated_linear_backward(dout, act, gate, w2, b2, hidden.dtype)
        del act
        dhidden = torch.ops.aten.gelu_backward(dact, tokens(hidden), approximate="tanh")
        dx, dshift, dscale, dw1, db1 = modulated_linear_backward(dhidden, x, shift, scale, w1, ctx.ops, ctx.eps,
                                                                 ctx.autocast)
        dx = dx + dout  # the residual path
        return (dx.to(x.dtype), dshift, dscale, dgate.to(gate.dtype), dw1.to(w1.dtype), db1.to(w1.dtype),
                dw2.to(w2.dtype), db2.to(w2.dtype), None, None, None)


def gated_mlp(x, shift, scale, gate, fc1: nn.Module, fc2: nn.Module, ops, eps: float = 1e-6) -> torch.Tensor:
    """x + gate * fc2(GELU_tanh(fc1(LN(x) * (1 + scale) + shift))), keeping x and one hidden tensor. `ops` is the
    kernel set (its layernorm_modulate and gate_residual). Linears converted by a precision backend (FP8: not plain
    nn.Linear) run as their own modules, which decide what they keep."""
    if type(fc1) is not nn.Linear or type(fc2) is not nn.Linear:
        hidden = F.gelu(fc1(ops.layernorm_modulate(x, shift, scale, eps)), approximate="tanh")
        return ops.gate_residual(x, gate, fc2(hidden))
    if x.dim() != 3 or gate.dim() != 2 or x.shape[0] % gate.shape[0]:
        raise ValueError(f"gated_mlp: expected x [N, S, D] and gate [M, D] with M dividing N, got {tuple(x.shape)} "
                         f"and {tuple(gate.shape)}")
    return GatedMlpFunction.apply(x, shift, scale, gate, fc1.weight, fc1.bias, fc2.weight, fc2.bias, ops, eps,
                                  activation_dtype(x))
