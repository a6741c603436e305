"""Linear -> GELU(tanh) -> Linear that keeps one hidden tensor for backward (a torch op; no Triton kernel).

Autograd on the plain composition keeps the fc1 input, the GELU input and the GELU output (fc2's input): two
[tokens, 4D] tensors. This Function keeps the fc1 input and the GELU input only and recomputes GELU in backward
(elementwise, no matmul). Under autocast it computes in the autocast dtype, as autocast's linears do, but keeps the
fp32 parameters rather than their bf16 casts and casts them again in backward: the casts are cheap, the copies are
not (autocast keeps 2 bytes per weight of every linear alive until backward).
"""
import torch
import torch.nn.functional as F
from torch import nn

from .lean import activation_dtype


def _tokens(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class GeluMlpFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, compute_dtype):
        device = x.device.type
        with torch.autocast(device, enabled=False):  # explicit casts below, as autocast would do them
            x_c = x.to(compute_dtype)
            hidden = F.linear(x_c, w1.to(compute_dtype), b1.to(compute_dtype))
            out = F.linear(F.gelu(hidden, approximate="tanh"), w2.to(compute_dtype), b2.to(compute_dtype))
        ctx.save_for_backward(x_c, hidden, w1, w2)
        ctx.input_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        x_c, hidden, w1, w2 = ctx.saved_tensors
        dtype = hidden.dtype
        dout = _tokens(dout.to(dtype))
        act = _tokens(F.gelu(hidden, approximate="tanh"))  # recomputed: not kept
        dw2, db2 = dout.t() @ act, dout.sum(0)
        del act
        dact = dout @ w2.to(dtype)
        dhidden = torch.ops.aten.gelu_backward(dact, _tokens(hidden), approximate="tanh")
        del dact
        dw1, db1 = dhidden.t() @ _tokens(x_c), dhidden.sum(0)
        dx = (dhidden @ w1.to(dtype)).view(x_c.shape).to(ctx.input_dtype)
        return dx, dw1.to(w1.dtype), db1.to(w1.dtype), dw2.to(w2.dtype), db2.to(w2.dtype), None


def gelu_mlp(x: torch.Tensor, fc1: nn.Module, fc2: nn.Module) -> torch.Tensor:
    """fc2(GELU_tanh(fc1(x))), saving one hidden tensor. Linears converted by a precision backend (FP8: not plain
    nn.Linear) run as their own modules, which decide what they keep."""
    if type(fc1) is not nn.Linear or type(fc2) is not nn.Linear:
        return fc2(F.gelu(fc1(x), approximate="tanh"))
    return GeluMlpFunction.apply(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, activation_dtype(x))
