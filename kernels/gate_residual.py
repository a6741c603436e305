"""The gated residual update residual + gate * y, alone or fused with the next LN + adaLN modulation.

residual, y [N, S, D]; gate (and shift, scale) [M, D] with the group rule of `kernels/reference.py`.
The fused op returns (out, LN(out) * (1 + scale) + shift) from one read of residual and y, like flash-attention's
dropout-add-LayerNorm; its backward takes gradients for both outputs in one pass.

There is no separate @triton.jit kernel here on purpose: both ops are the row kernels of
`kernels/layernorm_modulate.py` with the GATED_RESIDUAL flag on (and NORMALIZE off for the plain update), so the
residual and norm paths cannot drift apart. This file holds the launch logic, the autograd.Functions and the
functional entry points.
"""
import torch

from .lean import activation_dtype
from .layernorm_modulate import check_activation, check_group_vector, row_backward, row_forward

# ---------------------------------------------------------------------------------------------- launchers


def _check_residual_inputs(residual, gate, y):
    residual = check_activation("residual", residual)
    y = check_activation("y", y, residual.shape)
    gate = check_group_vector("gate", gate, residual.shape[0], residual.shape[2])
    return residual, gate, y, residual.dtype  # the residual stream keeps its dtype (train.residual_dtype)


def _vector_grad(grad, like):
    return None if grad is None else grad.to(like.dtype)


# ---------------------------------------------------------------------------------------------- autograd


class GateResidualFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, residual, gate, y):
        residual, gate, y, out_dtype = _check_residual_inputs(residual, gate, y)
        out, _, _, _ = row_forward(residual, gate=gate, y=y, normalize=False, out_dtype=out_dtype)
        ctx.save_for_backward(gate, y)
        ctx.residual_dtype = residual.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        gate, y = ctx.saved_tensors
        dout = dout.contiguous()
        _, _, _, dy, dgate = row_backward(dresidual_out=dout, gate=gate, y=y, dy_dtype=y.dtype)
        return dout.to(ctx.residual_dtype), _vector_grad(dgate, gate), dy


class GateResidualLayerNormModulateFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, residual, gate, y, shift, scale, eps, normed_dtype):
        residual, gate, y, out_dtype = _check_residual_inputs(residual, gate, y)
        shift = check_group_vector("shift", shift, residual.shape[0], residual.shape[2])
        scale = check_group_vector("scale", scale, residual.shape[0], residual.shape[2])
        out, normed, mean, rstd = row_forward(residual, shift, scale, eps, gate=gate, y=y, out_dtype=out_dtype,
                                              normed_dtype=normed_dtype)
        ctx.save_for_backward(out, mean, rstd, scale, gate, y)
        ctx.shift_groups = shift.shape[0]
        ctx.dtypes = (residual.dtype, shift.dtype)
        return out, normed

    @staticmethod
    def backward(ctx, dout, dnormed):
        out, mean, rstd, scale, gate, y = ctx.saved_tensors
        residual_dtype, shift_dtype = ctx.dtypes
        dresidual, dshift, dscale, dy, dgate = row_backward(
            dnormed.contiguous(), out, mean, rstd, scale, ctx.shift_groups, dresidual_out=dout.contiguous(),
            gate=gate, y=y, dx_dtype=residual_dtype, dy_dtype=y.dtype)
        return (dresidual, _vector_grad(dgate, gate), dy, dshift.to(shift_dtype), _vector_grad(dscale, scale), None,
                None)


def gate_residual(residual, gate, y):
    """residual + gate * y.   residual, y [N, S, D], gate [M, D] -> [N, S, D]."""
    return GateResidualFunction.apply(residual, gate, y)


def gate_residual_layernorm_modulate(residual, gate, y, shift, scale, eps: float = 1e-6):
    """(out, LN(out) * (1 + scale) + shift) with out = residual + gate * y, in one pass over the rows."""
    return GateResidualLayerNormModulateFunction.apply(residual, gate, y, shift, scale, eps, activation_dtype(residual))
