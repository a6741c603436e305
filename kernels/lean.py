"""Memory-lean torch ops: the `kernels = "torch"` set, saving for backward what the Triton kernels save.

kernels/reference.py is the plain ground truth; run under autograd it keeps an fp32 copy of every LayerNorm input
and the normalised values of every LN-modulate. The autograd.Functions here compute the reference in forward without
recording a graph, keep only the op's inputs, and recompute the elementwise work in backward (one more pass over
memory, no matmul). Outputs come in the activation dtype (`activation_dtype`): under bf16 autocast an LN-modulate
emits bf16, which the next linear would cast to anyway (and keep), so nothing is saved twice. The gated residual
update keeps the residual's dtype (train.residual_dtype).
"""
import torch

from . import reference


def activation_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the next linear computes in: autocast's under autocast, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def group_sum(t: torch.Tensor, groups: int) -> torch.Tensor:
    """[N, S, D] -> [groups, D]: the sum over each group's rows (rows n // (N // groups) share a vector)."""
    return t.reshape(groups, -1, t.shape[-1]).sum(1)


def layernorm_modulate_backward(dout, x, shift, scale, eps: float):
    """(dx, dshift, dscale) of reference.layernorm_modulate, recomputing the statistics from x; fp32 inside.
    Written out (no autograd.grad) so torch.compile traces the backward without a graph break."""
    xf = x.float()
    mean = xf.mean(-1, keepdim=True)
    rstd = torch.rsqrt((xf - mean).pow(2).mean(-1, keepdim=True) + eps)
    xhat = (xf - mean) * rstd
    dout = dout.float()
    dshift = group_sum(dout, shift.shape[0])
    dscale = group_sum(dout * xhat.to(x.dtype).float(), scale.shape[0])  # the reference modulates LN(x) in x's dtype
    dxhat = dout * (1 + reference.expand_groups(scale.float(), x.shape[0]))
    dx = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    return dx.to(x.dtype), dshift.to(shift.dtype), dscale.to(scale.dtype)


class LayerNormModulateFunction(torch.autograd.Function):
    """Saves x (and the [M, D] vectors); backward recomputes the statistics from x."""

    @staticmethod
    def forward(ctx, x, shift, scale, eps, out_dtype):
        ctx.save_for_backward(x, shift, scale)
        ctx.eps = eps
        return reference.layernorm_modulate(x, shift, scale, eps).to(out_dtype)

    @staticmethod
    def backward(ctx, dout):
        x, shift, scale = ctx.saved_tensors
        return (*layernorm_modulate_backward(dout, x, shift, scale, ctx.eps), None, None)


def layernorm_modulate(x, shift, scale, eps: float = 1e-6):
    """LN(x) * (1 + scale) + shift in the activation dtype, saving only x for backward."""
    return LayerNormModulateFunction.apply(x, shift, scale, eps, activation_dtype(x))


def gate_residual(residual, gate, y):
    """residual + gate * y in the residual's dtype. Autograd keeps y and the [N, 1, D] expanded gate: already lean."""
    return reference.gate_residual(residual, gate, y).to(residual.dtype)
