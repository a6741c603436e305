"""Patch embedding (Conv2d with kernel = stride = patch) as one GEMM whose loads do the patchify.

x [N, C, H, W] (any strides), weight [D, C, p, p], bias [D], pos_embed [(H/p)*(W/p), D] or None
-> tokens [N, (H/p)*(W/p), D].   With T = (H/p)*(W/p) tokens per frame and K = C*p*p features per patch,
token row m = n*T + t reads pixel (c, ph*p + i, pw*p + j) for feature k = (c*p + i)*p + j (the Conv2d weight order),
so no im2col copy is ever made. Bias and position embedding are added in the GEMM's epilogue.

Backward (patches never overlap, so every pixel belongs to exactly one (row, k)):
    dx       = dout [R, D] @ weight [D, K], scattered back to pixels by the same index arithmetic;
    dweight  = dout^T @ patches, split over row chunks (two-stage: fp32 partials, then a torch sum), with dbias
               = the column sums of dout computed in the same pass.
tl.dot needs every block dim >= 16: K (3 for C=3, p=1) is padded to a 16-multiple block by masked loads.
This file holds the kernels and their launchers; the public op, with its autograd, is custom_ops.patch_embed.
"""
import torch
import triton
import triton.language as tl

from .launch import LaunchConfig, Target, launch, target_of
from .layernorm_modulate import empty_output, finish_output


@triton.jit
def _patch_offsets(rows, ks, tokens_per_frame, patches_per_row, sx_n, sx_c, sx_h, sx_w, PATCH: tl.constexpr):
    """[rows, ks] offsets into x of token rows `rows` and patch features `ks` (c, i, j) = Conv2d weight order."""
    frame = rows // tokens_per_frame
    token = rows % tokens_per_frame
    top = (token // patches_per_row) * PATCH
    left = (token % patches_per_row) * PATCH
    row_offsets = frame.to(tl.int64) * sx_n + top.to(tl.int64) * sx_h + left.to(tl.int64) * sx_w
    channel = ks // (PATCH * PATCH)
    i = (ks // PATCH) % PATCH
    j = ks % PATCH
    k_offsets = channel.to(tl.int64) * sx_c + i.to(tl.int64) * sx_h + j.to(tl.int64) * sx_w
    return row_offsets[:, None] + k_offsets[None, :]


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """acc + a @ b in fp32. The CPU interpreter (triton 3.9) returns garbage for bf16 tl.dot, so there the operands
    go up to fp32 first: exact products and fp32 accumulation, which is what the GPU's bf16 MMA computes too."""
    if INTERPRETED:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _patch_embed_fwd_kernel(
    x_ptr, weight_ptr, bias_ptr, pos_ptr, out_ptr,
    n_rows, n_features, n_k, tokens_per_frame, patches_per_row, sx_n, sx_c, sx_h, sx_w,
    PATCH: tl.constexpr, HAS_POS: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    col_mask = cols < n_features
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, n_k, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < n_k
        patches = tl.load(
            x_ptr + _patch_offsets(rows, ks, tokens_per_frame, patches_per_row, sx_n, sx_c, sx_h, sx_w, PATCH),
            mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        weight_t = tl.load(weight_ptr + cols[None, :].to(tl.int64) * n_k + ks[:, None],
                           mask=k_mask[:, None] & col_mask[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
        acc = _dot(patches, weight_t.to(patches.dtype), acc, DOT_PRECISION, INTERPRETED)
    acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    if HAS_POS:
        token = rows % tokens_per_frame
        pos = tl.load(pos_ptr + token[:, None].to(tl.int64) * n_features + cols[None, :], mask=mask, other=0.0)
        acc += pos.to(tl.float32)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * n_features + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _patch_embed_bwd_input_kernel(
    dout_ptr, weight_ptr, dx_ptr,
    n_rows, n_features, n_k, tokens_per_frame, patches_per_row, sx_n, sx_c, sx_h, sx_w,
    PATCH: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # dpatches [BLOCK_M, BLOCK_K] = dout [BLOCK_M, D] @ weight [D, BLOCK_K], written straight to its pixels
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_mask = rows < n_rows
    k_mask = ks < n_k
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for d0 in range(0, n_features, BLOCK_N):
        cols = d0 + tl.arange(0, BLOCK_N)
        col_mask = cols < n_features
        dout = tl.load(dout_ptr + rows[:, None].to(tl.int64) * n_features + cols[None, :],
                       mask=row_mask[:, None] & col_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_N]
        weight = tl.load(weight_ptr + cols[:, None].to(tl.int64) * n_k + ks[None, :],
                         mask=col_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
        acc = _dot(dout, weight.to(dout.dtype), acc, DOT_PRECISION, INTERPRETED)
    offsets = _patch_offsets(rows, ks, tokens_per_frame, patches_per_row, sx_n, sx_c, sx_h, sx_w, PATCH)
    tl.store(dx_ptr + offsets, acc.to(dx_ptr.dtype.element_ty), mask=row_mask[:, None] & k_mask[None, :])


@triton.jit
def _patch_embed_bwd_weight_kernel(
    dout_ptr, x_ptr, partial_dweight_ptr, partial_dbias_ptr,  # partials [SPLIT, D, K] and [SPLIT, D], fp32
    n_rows, n_features, n_k, tokens_per_frame, patches_per_row, sx_n, sx_c, sx_h, sx_w,
    PATCH: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grid (D blocks, K blocks, splits): split s sums row tiles s, s + splits, ... of dout^T @ patches
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    split = tl.program_id(2)
    n_splits = tl.num_programs(2)
    col_mask = cols < n_features
    k_mask = ks < n_k
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    dbias = tl.zeros([BLOCK_N], dtype=tl.float32)
    for tile in range(split, tl.cdiv(n_rows, BLOCK_M), n_splits):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        dout_t = tl.load(dout_ptr + rows[None, :].to(tl.int64) * n_features + cols[:, None],
                         mask=col_mask[:, None] & row_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_M]
        patches = tl.load(
            x_ptr + _patch_offsets(rows, ks, tokens_per_frame, patches_per_row, sx_n, sx_c, sx_h, sx_w, PATCH),
            mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        acc = _dot(dout_t, patches.to(dout_t.dtype), acc, DOT_PRECISION, INTERPRETED)
        dbias += tl.sum(dout_t.to(tl.float32), axis=1)
    partial_w = (split * n_features + cols[:, None]).to(tl.int64) * n_k + ks[None, :]
    tl.store(partial_dweight_ptr + partial_w, acc, mask=col_mask[:, None] & k_mask[None, :])
    if tl.program_id(1) == 0:
        tl.store(partial_dbias_ptr + split * n_features + cols, dbias, mask=col_mask)


# ---------------------------------------------------------------------------------------------- launchers


class _Geometry:
    """Sizes and x strides the three kernels share, checked once."""

    def __init__(self, x, weight, patch):
        if x.dim() != 4:
            raise ValueError(f"x: expected [N, C, H, W], got shape {tuple(x.shape)}")
        n, c, h, w = x.shape
        if patch < 1 or h % patch or w % patch:
            raise ValueError(f"x: H={h} and W={w} must be multiples of patch={patch}")
        if weight.shape[1:] != (c, patch, patch):
            raise ValueError(f"weight: expected [D, {c}, {patch}, {patch}] (Conv2d layout), got {tuple(weight.shape)}")
        self.patch = patch
        self.features = weight.shape[0]
        self.k = c * patch * patch
        self.patches_per_row = w // patch
        self.tokens_per_frame = (h // patch) * (w // patch)
        self.rows = n * self.tokens_per_frame

    def args(self, x_strides):
        return (self.rows, self.features, self.k, self.tokens_per_frame, self.patches_per_row, *x_strides)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must match torch's fp32 matmul, so no TF32 there; other dtypes ignore the choice
    return "ieee" if dtype == torch.float32 else "tf32"


def _tiles(geometry, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of all three GEMMs. K = C*p*p is small (16 for Latte's 4 channels and
    patch 2), so tiles are wide in M and N. fp32 runs on FMA, not tensor cores (no TF32, see `_dot_precision`), and a
    64x128 fp32 tile needed 254 registers per thread (2 blocks per SM); 32x64 needs 80 (6 blocks per SM, sm_90a)."""
    block_k = max(16, min(64, triton.next_power_of_2(geometry.k)))
    block_m, block_n_max = (32, 64) if dtype == torch.float32 else (64, 128)
    block_n = max(16, min(block_n_max, triton.next_power_of_2(geometry.features)))
    return block_m, block_n, block_k, 4


def _meta(geometry, dtype, target, block_m, block_n, block_k, num_warps) -> dict:
    return dict(PATCH=geometry.patch, DOT_PRECISION=_dot_precision(dtype), INTERPRETED=target.interpreted,
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=3)


def forward_config(geometry, dtype: torch.dtype, target: Target) -> LaunchConfig:
    """How `_patch_embed_fwd_kernel` is launched at this geometry and dtype: one program per [BLOCK_M, BLOCK_N] tile."""
    block_m, block_n, block_k, num_warps = _tiles(geometry, dtype)
    grid = (triton.cdiv(geometry.rows, block_m), triton.cdiv(geometry.features, block_n))
    return LaunchConfig(grid, _meta(geometry, dtype, target, block_m, block_n, block_k, num_warps))


def backward_input_config(geometry, dtype: torch.dtype, target: Target) -> LaunchConfig:
    """How `_patch_embed_bwd_input_kernel` is launched: one program per [BLOCK_M, BLOCK_K] tile of patches."""
    block_m, block_n, block_k, num_warps = _tiles(geometry, dtype)
    grid = (triton.cdiv(geometry.rows, block_m), triton.cdiv(geometry.k, block_k))
    return LaunchConfig(grid, _meta(geometry, dtype, target, block_m, block_n, block_k, num_warps))


def backward_weight_config(geometry, dtype: torch.dtype, target: Target) -> LaunchConfig:
    """How `_patch_embed_bwd_weight_kernel` is launched: (D blocks, K blocks, row splits), with enough row splits to
    fill the device (never more than there are row tiles)."""
    block_m, block_n, block_k, num_warps = _tiles(geometry, dtype)
    d_blocks, k_blocks = triton.cdiv(geometry.features, block_n), triton.cdiv(geometry.k, block_k)
    row_tiles = triton.cdiv(geometry.rows, block_m)
    splits = max(1, min(row_tiles, triton.cdiv(target.programs_to_fill, d_blocks * k_blocks)))
    meta = _meta(geometry, dtype, target, block_m, block_n, block_k, num_warps)
    return LaunchConfig((d_blocks, k_blocks, splits), meta)


def patch_embed_forward(x, weight, bias, pos_embed, geometry):
    target = target_of(x.device)
    out = empty_output((x.shape[0], geometry.tokens_per_frame, geometry.features), x.dtype, x.device)
    config = forward_config(geometry, x.dtype, target)
    launch(_patch_embed_fwd_kernel, config.grid)(
        x, weight, bias, pos_embed if pos_embed is not None else bias, out, *geometry.args(x.stride()),
        HAS_POS=pos_embed is not None, **config.meta,
    )
    return finish_output(out, x.dtype)


def patch_embed_backward_input(dout, weight, x_shape, geometry):
    dx = empty_output(x_shape, dout.dtype, dout.device)
    config = backward_input_config(geometry, dout.dtype, target_of(dout.device))
    launch(_patch_embed_bwd_input_kernel, config.grid)(dout, weight, dx, *geometry.args(dx.stride()), **config.meta)
    return finish_output(dx, dout.dtype)


def patch_embed_backward_weight(dout, x, geometry):
    """(dweight [D, K] fp32, dbias [D] fp32)."""
    config = backward_weight_config(geometry, dout.dtype, target_of(dout.device))
    splits = config.grid[2]
    partial_dweight = torch.empty(splits, geometry.features, geometry.k, dtype=torch.float32, device=dout.device)
    partial_dbias = torch.empty(splits, geometry.features, dtype=torch.float32, device=dout.device)
    launch(_patch_embed_bwd_weight_kernel, config.grid)(
        dout, x, partial_dweight, partial_dbias, *geometry.args(x.stride()), **config.meta,
    )
    return partial_dweight.sum(0), partial_dbias.sum(0)


def _check_pos_embed(pos_embed, geometry):
    """[T, D] (or [1, T, D], the DiT buffer layout) -> contiguous [T, D]."""
    expected = (geometry.tokens_per_frame, geometry.features)
    if pos_embed.shape[-2:] != expected or pos_embed.numel() != expected[0] * expected[1]:
        raise ValueError(f"pos_embed: expected shape {list(expected)}, got {tuple(pos_embed.shape)}")
    return pos_embed.reshape(expected).contiguous()
