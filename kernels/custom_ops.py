"""The public entry points of the Triton kernels: each a registered custom op (torch.library), so torch.compile treats
it as one opaque call.

An autograd.Function around a Triton launcher makes dynamo trace into the launcher (device-property queries, Python
objects on ctx) and break the graph at every fused op. Registered here instead, with a fake (meta) implementation
that gives output shapes and dtypes and `register_autograd` for the backward, each op is a single node in the
compiled block's graph: inductor fuses the torch code around it and calls the kernel as is.

Each op wraps the raw launchers of its kernel file: `row_forward` / `row_backward` of kernels/layernorm_modulate.py
(LN-modulate, and the gated residual through the row kernels' GATED_RESIDUAL flag), the three launchers of
kernels/patch_embed.py and the two of kernels/temporal_attention.py. The functional wrappers below (layernorm_modulate,
gate_residual, patch_embed, temporal_attention) check shapes, naming the bad argument, and are what the Triton
KernelSet (kernels/triton_set.py), the tests and the benches call. Every op is checked by torch.library.opcheck in
tests/kernels/test_custom_ops.py.
"""
import torch
from torch import Tensor

from .lean import activation_dtype
from .layernorm_modulate import check_activation, check_group_vector, row_backward, row_forward
from .patch_embed import (_check_pos_embed, _Geometry, patch_embed_backward_input, patch_embed_backward_weight,
                          patch_embed_forward)
from .temporal_attention import check_qkv, temporal_backward, temporal_forward

LIBRARY = "ristretto"


def _row_stats(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[0] * x.shape[1], dtype=torch.float32)


def _vector_grad(groups: int, features: int, like: Tensor) -> Tensor:
    return like.new_empty((groups, features), dtype=torch.float32)


# ------------------------------------------------------------------------------------ LN + adaLN modulation

@torch.library.custom_op(f"{LIBRARY}::layernorm_modulate_fwd", mutates_args=())
def layernorm_modulate_fwd(x: Tensor, shift: Tensor, scale: Tensor, eps: float,
                           out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(LN(x) * (1 + scale) + shift in out_dtype, row means, row rstds)."""
    _, normed, mean, rstd = row_forward(x, shift, scale, eps, normed_dtype=out_dtype)
    return normed, mean, rstd


@layernorm_modulate_fwd.register_fake
def _(x, shift, scale, eps, out_dtype):
    return torch.empty_like(x, dtype=out_dtype), _row_stats(x), _row_stats(x)


@torch.library.custom_op(f"{LIBRARY}::layernorm_modulate_bwd", mutates_args=())
def layernorm_modulate_bwd(dout: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, scale: Tensor,
                           shift_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dshift fp32 [shift_groups, D], dscale fp32 [M, D])."""
    dx, dshift, dscale, _, _ = row_backward(dout, x, mean, rstd, scale, shift_groups)
    return dx, dshift, dscale


@layernorm_modulate_bwd.register_fake
def _(dout, x, mean, rstd, scale, shift_groups):
    return torch.empty_like(x), _vector_grad(shift_groups, x.shape[2], x), _vector_grad(scale.shape[0], x.shape[2], x)


def _layernorm_modulate_setup(ctx, inputs, output):
    x, shift, scale, _, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, mean, rstd, scale)
    ctx.shift_groups, ctx.dtypes = shift.shape[0], (shift.dtype, scale.dtype)


def _layernorm_modulate_backward(ctx, dnormed, _dmean, _drstd):
    x, mean, rstd, scale = ctx.saved_tensors
    dx, dshift, dscale = layernorm_modulate_bwd(dnormed.contiguous(), x, mean, rstd, scale, ctx.shift_groups)
    shift_dtype, scale_dtype = ctx.dtypes
    return dx, dshift.to(shift_dtype), dscale.to(scale_dtype), None, None


layernorm_modulate_fwd.register_autograd(_layernorm_modulate_backward, setup_context=_layernorm_modulate_setup)


def layernorm_modulate(x, shift, scale, eps: float = 1e-6):
    """LN(x) without affine, then LN(x) * (1 + scale) + shift.   x [N, S, D], shift/scale [M, D] -> [N, S, D]
    in the activation dtype (autocast's under autocast: the next linear's input, not cast and kept again)."""
    x = check_activation("x", x)
    shift = check_group_vector("shift", shift, x.shape[0], x.shape[2])
    scale = check_group_vector("scale", scale, x.shape[0], x.shape[2])
    return layernorm_modulate_fwd(x, shift, scale, eps, activation_dtype(x))[0]


# ----------------------------------------------------------------------------------------- gated residual

@torch.library.custom_op(f"{LIBRARY}::gate_residual_fwd", mutates_args=())
def gate_residual_fwd(residual: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """residual + gate * y in the residual's dtype (the residual stream keeps its dtype: train.residual_dtype)."""
    out, _, _, _ = row_forward(residual, gate=gate, y=y, normalize=False, out_dtype=residual.dtype)
    return out


@gate_residual_fwd.register_fake
def _(residual, gate, y):
    return torch.empty_like(residual)


@torch.library.custom_op(f"{LIBRARY}::gate_residual_bwd", mutates_args=())
def gate_residual_bwd(dout: Tensor, gate: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(dy = gate * dout, dgate fp32 [M, D])."""
    _, _, _, dy, dgate = row_backward(dresidual_out=dout, gate=gate, y=y, dy_dtype=y.dtype)
    return dy, dgate


@gate_residual_bwd.register_fake
def _(dout, gate, y):
    return torch.empty_like(y), _vector_grad(gate.shape[0], y.shape[2], y)


def _gate_residual_setup(ctx, inputs, output):
    residual, gate, y = inputs
    ctx.save_for_backward(gate, y)
    ctx.residual_dtype = residual.dtype


def _gate_residual_backward(ctx, dout):
    gate, y = ctx.saved_tensors
    dout = dout.contiguous()
    dy, dgate = gate_residual_bwd(dout, gate, y)
    return dout.to(ctx.residual_dtype), dgate.to(gate.dtype), dy


gate_residual_fwd.register_autograd(_gate_residual_backward, setup_context=_gate_residual_setup)


def gate_residual(residual, gate, y):
    """residual + gate * y.   residual, y [N, S, D], gate [M, D] -> [N, S, D]."""
    residual = check_activation("residual", residual)
    y = check_activation("y", y, residual.shape)
    return gate_residual_fwd(residual, check_group_vector("gate", gate, residual.shape[0], residual.shape[2]), y)


# ------------------------------------------------------------------------------------------------ patch embed

@torch.library.custom_op(f"{LIBRARY}::patch_embed_fwd", mutates_args=())
def patch_embed_fwd(x: Tensor, weight: Tensor, bias: Tensor, pos_embed: Tensor | None, patch: int) -> Tensor:
    """tokens [N, T, D] of x [N, C, H, W] (read through its strides), weight [D, C, p, p], pos_embed [T, D]."""
    geometry = _Geometry(x, weight, patch)
    weight_2d = weight.reshape(geometry.features, geometry.k).contiguous()
    return patch_embed_forward(x, weight_2d, bias.contiguous(), pos_embed, geometry)


@patch_embed_fwd.register_fake
def _(x, weight, bias, pos_embed, patch):
    n, _, h, w = x.shape
    return x.new_empty((n, (h // patch) * (w // patch), weight.shape[0]))


@torch.library.custom_op(f"{LIBRARY}::patch_embed_bwd_input", mutates_args=())
def patch_embed_bwd_input(dout: Tensor, x: Tensor, weight: Tensor, patch: int) -> Tensor:
    """dx [N, C, H, W] (contiguous, dout's dtype)."""
    geometry = _Geometry(x, weight, patch)
    return patch_embed_backward_input(dout, weight.reshape(geometry.features, geometry.k).contiguous(), x.shape,
                                      geometry)


@patch_embed_bwd_input.register_fake
def _(dout, x, weight, patch):
    return dout.new_empty(x.shape)


@torch.library.custom_op(f"{LIBRARY}::patch_embed_bwd_weight", mutates_args=())
def patch_embed_bwd_weight(dout: Tensor, x: Tensor, weight: Tensor, patch: int) -> tuple[Tensor, Tensor]:
    """(dweight fp32 [D, C*p*p], dbias fp32 [D])."""
    return patch_embed_backward_weight(dout, x, _Geometry(x, weight, patch))


@patch_embed_bwd_weight.register_fake
def _(dout, x, weight, patch):
    features = weight.shape[0]
    return dout.new_empty((features, weight[0].numel()), dtype=torch.float32), \
        dout.new_empty((features,), dtype=torch.float32)


def _patch_embed_setup(ctx, inputs, output):
    x, weight, bias, pos_embed, patch = inputs
    ctx.save_for_backward(x, weight)
    ctx.patch, ctx.bias_dtype = patch, bias.dtype
    ctx.pos_like = None if pos_embed is None else (pos_embed.shape, pos_embed.dtype)


def _patch_embed_backward(ctx, dout):
    x, weight = ctx.saved_tensors
    dout = dout.contiguous().to(x.dtype)
    dx = dweight = dbias = dpos = None
    if ctx.needs_input_grad[0]:
        dx = patch_embed_bwd_input(dout, x, weight, ctx.patch)
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        dweight, dbias = patch_embed_bwd_weight(dout, x, weight, ctx.patch)
        dweight, dbias = dweight.reshape(weight.shape).to(weight.dtype), dbias.to(ctx.bias_dtype)
    if ctx.needs_input_grad[3]:  # a trainable position table: the plain torch sum over frames
        pos_shape, pos_dtype = ctx.pos_like
        dpos = dout.float().sum(0).reshape(pos_shape).to(pos_dtype)
    return dx, dweight, dbias, dpos, None


patch_embed_fwd.register_autograd(_patch_embed_backward, setup_context=_patch_embed_setup)


def patch_embed(x, weight, bias, pos_embed, patch: int):
    """Conv2d(kernel=stride=patch) + bias + position table.   x [N, C, H, W] -> tokens [N, (H/p)*(W/p), D]."""
    geometry = _Geometry(x, weight, patch)  # raises on a wrong shape, naming it
    if bias.shape != (geometry.features,):
        raise ValueError(f"bias: expected shape [{geometry.features}], got {tuple(bias.shape)}")
    return patch_embed_fwd(x, weight, bias, _check_pos_embed(pos_embed, geometry) if pos_embed is not None else None,
                           patch)


# ----------------------------------------------------------------------------------------- temporal attention

@torch.library.custom_op(f"{LIBRARY}::temporal_attention_fwd", mutates_args=())
def temporal_attention_fwd(qkv: Tensor, frames: int) -> tuple[Tensor, Tensor]:
    """(out [B*F, S, heads, dim], fp32 logsumexp [B*F, S, heads]) of attention over each position's F frames."""
    return temporal_forward(qkv, frames)


@temporal_attention_fwd.register_fake
def _(qkv, frames):
    rows, positions, _, heads, dim = qkv.shape
    return qkv.new_empty((rows, positions, heads, dim)), qkv.new_empty((rows, positions, heads), dtype=torch.float32)


@torch.library.custom_op(f"{LIBRARY}::temporal_attention_bwd", mutates_args=())
def temporal_attention_bwd(qkv: Tensor, out: Tensor, dout: Tensor, lse: Tensor, frames: int) -> Tensor:
    """dqkv [B*F, S, 3, heads, dim]."""
    return temporal_backward(qkv, out, dout, lse, frames)


@temporal_attention_bwd.register_fake
def _(qkv, out, dout, lse, frames):
    return torch.empty_like(qkv)


def _temporal_setup(ctx, inputs, output):
    qkv, frames = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)  # q, k, v once (one storage), out, fp32 logsumexp
    ctx.frames = frames


def _temporal_backward(ctx, dout, _dlse):
    qkv, out, lse = ctx.saved_tensors
    return temporal_attention_bwd(qkv, out, dout.contiguous(), lse, ctx.frames), None


temporal_attention_fwd.register_autograd(_temporal_backward, setup_context=_temporal_setup)


def temporal_attention(qkv: Tensor, frames: int) -> Tensor:
    """Attention over the F frames of each spatial position.   qkv [B*F, S, 3, heads, dim] -> [B*F, S, heads, dim]."""
    return temporal_attention_fwd(check_qkv(qkv, frames), frames)[0]
