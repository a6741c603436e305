"""adaLN modulation of a LayerNorm without affine: y = LN(x) * (1 + scale) + shift, fused in one row kernel.

x [N, S, D] (fp32 / bf16 / fp16, statistics in fp32); shift/scale [M, D] with the group rule of
`kernels/reference.py`: activation row n uses vector n // (N // M). Flattened to 2-D, row r = n * S + s belongs to
group r // rows_per_group with rows_per_group = S * N // M, which is what the kernels index with.

The same two row kernels also serve the gated residual update residual + gate * y through `tl.constexpr` flags (one
kernel, variants by flag, as in flash-attention's layer_norm.py; gate_residual has no kernel of its own):
    GATED_RESIDUAL  the row input is residual + gate * y (stored as the residual output) instead of x;
    NORMALIZE       apply LN + modulation (off: plain gated residual).
Backward reduces dshift / dscale / dgate over the rows of a group in two stages without atomics: each program sums
a strided set of row tiles of one group into registers and writes one partial row; torch sums the partials.

This file holds the kernels and their launchers (`row_forward`, `row_backward`); the public ops, with their autograd,
are the custom ops `layernorm_modulate` and `gate_residual` of kernels/custom_ops.py.
"""
import math

import torch
import triton
import triton.language as tl

from .launch import launch, target_of

MAX_FEATURES = 16384  # one row must fit one program's registers


@triton.jit
def _group_offsets(rows, rows_per_group, row_stride, cols):
    """[BLOCK_ROWS, BLOCK_D] offsets of each row's per-group vector."""
    return (rows // rows_per_group).to(tl.int64)[:, None] * row_stride + cols[None, :]


@triton.jit
def _row_fwd_kernel(
    x_ptr, gate_ptr, y_ptr, residual_out_ptr,  # residual path (gate, y, residual_out used when GATED_RESIDUAL)
    shift_ptr, scale_ptr, out_ptr, mean_ptr, rstd_ptr,  # norm path (used when NORMALIZE)
    n_rows, n_cols, rows_per_gate, rows_per_shift, rows_per_scale,  # a row's vector: row // rows_per_<vector>
    gate_stride, shift_stride, scale_stride, eps,
    BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, GATED_RESIDUAL: tl.constexpr, NORMALIZE: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < n_cols)[None, :]
    offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]

    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if GATED_RESIDUAL:
        gate = tl.load(gate_ptr + _group_offsets(rows, rows_per_gate, gate_stride, cols), mask=mask, other=0.0)
        gate = gate.to(tl.float32)
        y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        x = x + gate * y
        tl.store(residual_out_ptr + offsets, x.to(residual_out_ptr.dtype.element_ty), mask=mask)
    if NORMALIZE:
        mean = tl.sum(x, axis=1) / n_cols
        centered = tl.where(mask, x - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(centered * centered, axis=1) / n_cols + eps)
        tl.store(mean_ptr + rows, mean, mask=row_mask)
        tl.store(rstd_ptr + rows, rstd, mask=row_mask)
        shift = tl.load(shift_ptr + _group_offsets(rows, rows_per_shift, shift_stride, cols), mask=mask, other=0.0)
        scale = tl.load(scale_ptr + _group_offsets(rows, rows_per_scale, scale_stride, cols), mask=mask, other=0.0)
        shift, scale = shift.to(tl.float32), scale.to(tl.float32)
        out = centered * rstd[:, None] * (1.0 + scale) + shift
        tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row_bwd_kernel(
    x_ptr, mean_ptr, rstd_ptr, scale_ptr, dout_ptr, dx_ptr,  # norm path (x = the normalised input)
    dresidual_out_ptr, gate_ptr, y_ptr, dy_ptr,  # residual path
    partial_dshift_ptr, partial_dscale_ptr, partial_dgate_ptr,  # [M, programs_per_group, D] fp32
    n_cols, rows_per_group, groups_per_gate, groups_per_scale, gate_stride, scale_stride,
    BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, GATED_RESIDUAL: tl.constexpr, NORMALIZE: tl.constexpr,
    HAS_DRESIDUAL: tl.constexpr,
):
    # grid (G, programs_per_group) over the finest grouping G of all vectors: every program stays inside one group
    # of each vector, so its vector grads are plain row sums
    group = tl.program_id(0)
    program = tl.program_id(1)
    programs_per_group = tl.num_programs(1)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < n_cols
    if NORMALIZE:
        scale_row = (group // groups_per_scale).to(tl.int64) * scale_stride
        scale = tl.load(scale_ptr + scale_row + cols, mask=col_mask, other=0.0).to(tl.float32)
    if GATED_RESIDUAL:
        gate_row = (group // groups_per_gate).to(tl.int64) * gate_stride
        gate = tl.load(gate_ptr + gate_row + cols, mask=col_mask, other=0.0).to(tl.float32)
    dshift = tl.zeros([BLOCK_D], dtype=tl.float32)
    dscale = tl.zeros([BLOCK_D], dtype=tl.float32)
    dgate = tl.zeros([BLOCK_D], dtype=tl.float32)
    group_start = group.to(tl.int64) * rows_per_group
    for tile in range(program, tl.cdiv(rows_per_group, BLOCK_ROWS), programs_per_group):
        local_rows = tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_mask = local_rows < rows_per_group
        rows = group_start + local_rows
        mask = row_mask[:, None] & col_mask[None, :]
        offsets = rows[:, None] * n_cols + cols[None, :]
        dx = tl.zeros([BLOCK_ROWS, BLOCK_D], dtype=tl.float32)
        if NORMALIZE:
            x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
            dout = tl.load(dout_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            dshift += tl.sum(dout, axis=0)
            dscale += tl.sum(dout * xhat, axis=0)
            dxhat = dout * (1.0 + scale[None, :])
            mean_dxhat = tl.sum(dxhat, axis=1) / n_cols
            mean_dxhat_xhat = tl.sum(dxhat * xhat, axis=1) / n_cols
            dx = (dxhat - mean_dxhat[:, None] - xhat * mean_dxhat_xhat[:, None]) * rstd[:, None]
        if HAS_DRESIDUAL:
            dx += tl.load(dresidual_out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if NORMALIZE:
            tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if GATED_RESIDUAL:
            y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            tl.store(dy_ptr + offsets, (gate[None, :] * dx).to(dy_ptr.dtype.element_ty), mask=mask)
            dgate += tl.sum(tl.where(mask, dx * y, 0.0), axis=0)
    partial = (group * programs_per_group + program).to(tl.int64) * n_cols + cols
    if NORMALIZE:
        tl.store(partial_dshift_ptr + partial, dshift, mask=col_mask)
        tl.store(partial_dscale_ptr + partial, dscale, mask=col_mask)
    if GATED_RESIDUAL:
        tl.store(partial_dgate_ptr + partial, dgate, mask=col_mask)


# ---------------------------------------------------------------------------------------------- launchers


def empty_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A kernel's output buffer. The CPU interpreter (triton 3.9) truncates fp32 -> bf16 instead of rounding to
    nearest even as the GPU does, so there bf16 outputs are written in fp32 and rounded by torch (`finish_output`)."""
    if dtype == torch.bfloat16 and target_of(device).interpreted:
        return torch.empty(shape, dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def finish_output(buffer, dtype: torch.dtype):
    """The output in `dtype` (a no-op except for the interpreter's fp32 stand-in for bf16)."""
    return buffer if buffer is None or buffer.dtype == dtype else buffer.to(dtype)


def _row_blocks(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_D, num_warps): a whole row per program, several rows when rows are short."""
    if n_cols > MAX_FEATURES:
        raise ValueError(f"feature size D={n_cols} exceeds the row kernels' limit of {MAX_FEATURES}")
    block_d = triton.next_power_of_2(n_cols)
    # ~4K elements per tile keeps a row tile in registers; the interpreter uses the same tiling so that CPU tests
    # walk the same multi-tile loops as the GPU
    block_rows = max(1, 4096 // block_d)
    elements = block_rows * block_d
    num_warps = 4 if elements <= 2048 else 8 if elements <= 8192 else 16
    return block_rows, block_d, num_warps


def _row_backward_blocks(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_D, num_warps) of the backward: it keeps about five row tiles live (x, dout, xhat, dxhat, y),
    so it takes half the forward's rows per tile and 4 elements per thread. With the forward's 2 x 2048 tile on 8 warps
    the fused gate + LN backward needed 176 registers, one block per SM; one row on 16 warps needs under 64, two
    blocks (bench/compile_check.py, sm_90a)."""
    block_rows, block_d, _ = _row_blocks(n_cols)
    block_rows = max(1, block_rows // 2)
    num_warps = max(4, min(16, block_rows * block_d // (4 * 32)))
    return block_rows, block_d, num_warps


def _programs_per_group(groups: int, rows_per_group: int, block_rows: int, device: torch.device) -> int:
    """Enough programs to fill the device (4 per SM), never more than a group has row tiles."""
    return max(1, min(triton.cdiv(rows_per_group, block_rows), triton.cdiv(target_of(device).programs_to_fill, groups)))


def check_group_vector(name: str, vector: torch.Tensor, rows: int, features: int) -> torch.Tensor:
    """A per-group [M, D] vector whose M divides `rows`; returned with unit feature stride (rows may be strided)."""
    if vector.dim() != 2 or vector.shape[1] != features or vector.shape[0] == 0 or rows % vector.shape[0]:
        raise ValueError(f"{name}: expected shape [M, {features}] with M dividing the activations' N={rows}, "
                         f"got {tuple(vector.shape)}")
    return vector if vector.stride(1) == 1 else vector.contiguous()


def check_activation(name: str, tensor: torch.Tensor, shape=None) -> torch.Tensor:
    """A 3-D [N, S, D] activation (made contiguous) matching `shape` when given."""
    if tensor.dim() != 3 or (shape is not None and tensor.shape != shape):
        expected = "[N, S, D]" if shape is None else list(shape)
        raise ValueError(f"{name}: expected shape {expected}, got {tuple(tensor.shape)}")
    return tensor.contiguous()


def row_forward(x, shift=None, scale=None, eps=1e-6, gate=None, y=None, normalize=True, out_dtype=None,
                normed_dtype=None):
    """Launch the forward row kernel on [N, S, D] activations.

    Returns (residual_out, normed, mean, rstd), None where a path is off; gate/y given -> the row input is x + gate * y.
    residual_out comes in out_dtype, normed in normed_dtype (both default to x's dtype).
    """
    n, s, d = x.shape
    gated = gate is not None
    out_dtype = out_dtype or x.dtype
    normed_dtype = normed_dtype or out_dtype
    n_rows = n * s
    block_rows, block_d, num_warps = _row_blocks(d)
    residual_out = empty_output(x.shape, out_dtype, x.device) if gated else None
    normed = empty_output(x.shape, normed_dtype, x.device) if normalize else None
    mean = torch.empty(n_rows, dtype=torch.float32, device=x.device) if normalize else None
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device) if normalize else None
    gate, shift, scale = (v if v is not None else x[0, :1] for v in (gate, shift, scale))  # placeholders if off
    dummy = x  # never read or written: its flag is off
    launch(_row_fwd_kernel, (triton.cdiv(n_rows, block_rows),))(
        x, gate, y if gated else dummy, residual_out if gated else dummy,
        shift, scale, normed if normalize else dummy, mean if normalize else dummy, rstd if normalize else dummy,
        n_rows, d, n_rows // gate.shape[0], n_rows // shift.shape[0], n_rows // scale.shape[0],
        gate.stride(0), shift.stride(0), scale.stride(0), eps,
        BLOCK_ROWS=block_rows, BLOCK_D=block_d, GATED_RESIDUAL=gated, NORMALIZE=normalize, num_warps=num_warps,
    )
    return finish_output(residual_out, out_dtype), finish_output(normed, normed_dtype), mean, rstd


def _sum_partials(partial: torch.Tensor, groups: int) -> torch.Tensor:
    """Second reduction stage: [G, programs, D] fp32 partials -> [groups, D], G a multiple of groups."""
    return partial.reshape(groups, -1, partial.shape[-1]).sum(1)


def row_backward(dout=None, x=None, mean=None, rstd=None, scale=None, shift_groups=None, dresidual_out=None,
                 gate=None, y=None, dx_dtype=None, dy_dtype=None):
    """Launch the backward row kernel; returns (dx, dshift, dscale, dy, dgate), None where a path is off.

    Norm path (dout given): dx of LN-modulate of x. Residual path (gate given): dx (plus dresidual_out) is also the
    gradient of residual + gate * y, so dy = gate * dx and dgate = sum over the group's rows of dx * y.
    Vector grads are fp32 [M, D].
    """
    normalize = dout is not None
    gated = gate is not None
    like = x if normalize else dresidual_out
    n, s, d = like.shape
    vector_groups = [v.shape[0] for v in (scale, gate) if v is not None] + ([shift_groups] if shift_groups else [])
    groups = math.lcm(*vector_groups)  # the finest grouping; divides N because every vector's M does
    rows_per_group = n * s // groups
    block_rows, block_d, num_warps = _row_backward_blocks(d)
    programs = _programs_per_group(groups, rows_per_group, block_rows, like.device)
    partial_shape = (groups, programs, d)
    f32 = dict(dtype=torch.float32, device=like.device)
    partial_dshift = torch.empty(partial_shape, **f32) if normalize else None
    partial_dscale = torch.empty(partial_shape, **f32) if normalize else None
    partial_dgate = torch.empty(partial_shape, **f32) if gated else None
    dx_dtype, dy_dtype = dx_dtype or like.dtype, dy_dtype or like.dtype
    dx = empty_output(like.shape, dx_dtype, like.device) if normalize else None
    dy = empty_output(like.shape, dy_dtype, like.device) if gated else None
    gate_or_dummy = gate if gated else like[0, :1]
    scale_or_dummy = scale if normalize else like[0, :1]
    dummy = like  # never read or written: its flag is off
    launch(_row_bwd_kernel, (groups, programs))(
        x if normalize else dummy, mean if normalize else dummy, rstd if normalize else dummy,
        scale_or_dummy, dout if normalize else dummy, dx if normalize else dummy,
        dresidual_out if dresidual_out is not None else dummy, gate_or_dummy, y if gated else dummy,
        dy if gated else dummy,
        partial_dshift if normalize else dummy, partial_dscale if normalize else dummy,
        partial_dgate if gated else dummy,
        d, rows_per_group, groups // gate_or_dummy.shape[0], groups // scale_or_dummy.shape[0],
        gate_or_dummy.stride(0), scale_or_dummy.stride(0),
        BLOCK_ROWS=block_rows, BLOCK_D=block_d, GATED_RESIDUAL=gated, NORMALIZE=normalize,
        HAS_DRESIDUAL=dresidual_out is not None, num_warps=num_warps,
    )
    dshift = _sum_partials(partial_dshift, shift_groups) if normalize else None
    dscale = _sum_partials(partial_dscale, scale.shape[0]) if normalize else None
    dgate = _sum_partials(partial_dgate, gate.shape[0]) if gated else None
    return finish_output(dx, dx_dtype), dshift, dscale, finish_output(dy, dy_dtype), dgate
