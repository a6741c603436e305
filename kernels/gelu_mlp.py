"""LN-modulate -> Linear -> GELU(tanh) -> Linear that keeps one hidden tensor for backward (a torch op composing
the kernel set's LN-modulate with torch linears; no Triton kernel of its own).

Autograd on the plain composition keeps the normalised input (fc1's input), the GELU input and the GELU output
(fc2's input): two [tokens, 4D] tensors and one [tokens, D]. This Function keeps the block's residual x (which nothing
else keeps) and the GELU input, and recomputes the LN-modulate and the GELU in backward (elementwise, no matmul).
Under autocast it computes in the autocast dtype, as autocast's linears do, but keeps the fp32 parameters rather
than their bf16 casts and casts them again in backward: the casts are cheap, the copies are not (autocast keeps
2 bytes per weight of every linear alive until backward).
"""
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from .lean import activation_dtype


def _tokens(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class ModulatedGeluMlpFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, w1, b1, w2, b2, norm, compute_dtype):
        device = x.device.type
        normed = norm(x, shift, scale)  # in the activation dtype (autocast is still on here)
        with torch.autocast(device, enabled=False):  # explicit casts below, as autocast would do them
            hidden = F.linear(normed.to(compute_dtype), w1.to(compute_dtype), b1.to(compute_dtype))
            out = F.linear(F.gelu(hidden, approximate="tanh"), w2.to(compute_dtype), b2.to(compute_dtype))
        ctx.save_for_backward(x, shift, scale, hidden, w1, w2)
        ctx.norm, ctx.autocast = norm, torch.is_autocast_enabled(device)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, shift, scale, hidden, w1, w2 = ctx.saved_tensors
        dtype = hidden.dtype
        dout = _tokens(dout.to(dtype))
        act = _tokens(F.gelu(hidden, approximate="tanh"))  # recomputed: not kept
        dw2, db2 = dout.t() @ act, dout.sum(0)
        del act
        dhidden = torch.ops.aten.gelu_backward(dout @ w2.to(dtype), _tokens(hidden), approximate="tanh")
        needs = ctx.needs_input_grad[:3]
        with torch.enable_grad():  # the LN-modulate again, as the forward ran it (same autocast state)
            leaves = [t.detach().requires_grad_(need) for t, need in zip((x, shift, scale), needs)]
            autocast = torch.autocast(x.device.type, dtype=dtype) if ctx.autocast else nullcontext()
            with autocast:
                normed = ctx.norm(*leaves)
        dw1, db1 = dhidden.t() @ _tokens(normed.detach().to(dtype)), dhidden.sum(0)
        dnormed = (dhidden @ w1.to(dtype)).view(normed.shape).to(normed.dtype)
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        grads = iter(torch.autograd.grad(normed, wanted, dnormed) if wanted else ())
        dx, dshift, dscale = (next(grads) if leaf.requires_grad else None for leaf in leaves)
        return (dx, dshift, dscale, dw1.to(w1.dtype), db1.to(w1.dtype), dw2.to(w2.dtype), db2.to(w2.dtype),
                None, None)


def modulated_gelu_mlp(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, norm, fc1: nn.Module,
                       fc2: nn.Module) -> torch.Tensor:
    """fc2(GELU_tanh(fc1(norm(x, shift, scale)))), keeping x and one hidden tensor. `norm` is the kernel set's
    LN-modulate (eps bound). Linears converted by a precision backend (FP8: not plain nn.Linear) run as their own
    modules, which decide what they keep."""
    if type(fc1) is not nn.Linear or type(fc2) is not nn.Linear:
        return fc2(F.gelu(fc1(norm(x, shift, scale)), approximate="tanh"))
    return ModulatedGeluMlpFunction.apply(x, shift, scale, fc1.weight, fc1.bias, fc2.weight, fc2.bias, norm,
                                          activation_dtype(x))
