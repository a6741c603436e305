"""Temporal attention of Latte read straight from the spatial layout: no [B*S, F, D] copies in either direction.

qkv [B*F, S, 3, heads, dim] is the qkv projection's output in the spatial (frames-major) layout: row b*F + f holds
frame f of sample b. At every spatial position s and head h, the F frames attend to each other:
    out[b*F + i, s, h] = softmax_j(q[b*F + i, s, h] . k[b*F + j, s, h] / sqrt(dim)) @ v[b*F + j, s, h]
and out [B*F, S, heads, dim] is written in the same spatial layout, ready for the output projection.

One program per (sample, block of BLOCK_S spatial positions, group of HEADS adjacent heads). It loads the F x dim
tiles of q, k, v of its (position, head) pairs (a group's heads are HEADS*dim contiguous values; consecutive frames
of a position are S*3*heads*dim apart), keeps the F x F scores of each pair in registers (a tl.dot batched over the
pairs) and writes out and the fp32 logsumexp. Backward recomputes the probabilities from the logsumexp
(flash-attention's scheme), accumulates in fp32, and writes dq, dk, dv into one dqkv buffer shaped like qkv, so
nothing is stacked afterwards.

Padding and what it costs: frames and head dim are covered by tl.arange over powers of two (at least 16, the
smallest tl.dot tile) with masks. Masked lanes read no memory, so the HBM traffic is exact; the tensor-core work is
padded: dim 72 and 88 run as 128 (56% and 69% of the MMA lanes useful), F=16 runs as 16 (none wasted), F=17 as 32.
The kernel is memory-bound at F=16 (about 8 FLOP per byte), so the padded MMA lanes cost registers, not time;
F > 64 is refused (the F x F tile per pair would spill).

Image frames of joint image+video batches take no part (the model passes only the video frames' rows).
This file holds the kernels and their launchers; the public op, with its autograd, is custom_ops.temporal_attention.
"""
import math

import torch
import triton
import triton.language as tl

from .launch import launch, target_of

MAX_FRAMES = 64
MIN_DOT = 16  # tl.dot needs every tile dimension >= 16


def padded(n: int) -> int:
    return max(MIN_DOT, triton.next_power_of_2(n))


# ------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _pairs(n_pos, n_heads, BLOCK_S: tl.constexpr, HEADS: tl.constexpr):
    """This program's (position, head) pairs, heads fastest (a token's heads sit side by side in memory), and which
    of them exist (positions past S and heads past the last are padding)."""
    pair = tl.arange(0, BLOCK_S * HEADS)
    positions = tl.program_id(1) * BLOCK_S + pair // HEADS
    heads = tl.program_id(2) * HEADS + pair % HEADS
    return positions, heads, (positions < n_pos) & (heads < n_heads)


@triton.jit
def _offsets(sample, positions, heads, valid, n_pos, n_heads, parts,
             F_PAD: tl.constexpr, D_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, N_FRAMES: tl.constexpr):
    """(PAIRS, F_PAD, D_PAD) offsets of each pair's frames x dims in a [B*F, S, parts, heads, dim] tensor (part 0),
    and the mask: padding pairs, frames past F and dims past HEAD_DIM are masked."""
    frames = tl.arange(0, F_PAD)
    dims = tl.arange(0, D_PAD)
    rows = sample.to(tl.int64) * N_FRAMES + frames  # (F_PAD,)
    token = rows[None, :, None] * n_pos + positions.to(tl.int64)[:, None, None]  # (PAIRS, F_PAD, 1)
    offsets = token * (parts * n_heads * HEAD_DIM) + heads[:, None, None] * HEAD_DIM + dims[None, None, :]
    mask = valid[:, None, None] & (frames < N_FRAMES)[None, :, None] & (dims < HEAD_DIM)[None, None, :]
    return offsets, mask


@triton.jit
def _lse_offsets(sample, positions, heads, valid, n_pos, n_heads, F_PAD: tl.constexpr, N_FRAMES: tl.constexpr):
    """(PAIRS, F_PAD) offsets and mask in the fp32 logsumexp [B*F, S, heads]."""
    frames = tl.arange(0, F_PAD)
    rows = sample.to(tl.int64) * N_FRAMES + frames
    offsets = (rows[None, :] * n_pos + positions[:, None]) * n_heads + heads[:, None]
    return offsets, valid[:, None] & (frames < N_FRAMES)[None, :]


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Batched a @ b with an fp32 result. UPCAST (interpreter only): Triton 3.9's interpreter returns garbage for bf16
    tl.dot (errors ~1e10 on a 16x16 product), so the rounded operands are widened to fp32 first; products of bf16
    values are exact in fp32, so this computes what the tensor cores do."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _cast(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 x -> dtype, rounding to nearest even. UPCAST (interpreter only): Triton 3.9's interpreter truncates
    fp32 -> bf16 (a biased error of up to one ulp, seen in every bf16 store), so the fp32 bits are rounded first and
    the truncation is then exact. On a GPU the conversion rounds to nearest even by itself."""
    if UPCAST:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _scores(q, k, sm_scale, F_PAD: tl.constexpr, N_FRAMES: tl.constexpr, PRECISION: tl.constexpr,
            UPCAST: tl.constexpr):
    """(PAIRS, F_PAD, F_PAD) fp32 scaled scores q k^T per position, keys past N_FRAMES at -inf."""
    s = _dot(q, tl.permute(k, (0, 2, 1)), PRECISION, UPCAST) * sm_scale
    keys = tl.arange(0, F_PAD)
    return tl.where((keys < N_FRAMES)[None, None, :], s, float("-inf"))


@triton.jit
def _temporal_fwd_kernel(
    qkv_ptr, out_ptr, lse_ptr, n_pos, n_heads, sm_scale,
    BLOCK_S: tl.constexpr, HEADS: tl.constexpr, F_PAD: tl.constexpr, D_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    N_FRAMES: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    sample = tl.program_id(0)
    positions, heads, valid = _pairs(n_pos, n_heads, BLOCK_S, HEADS)
    offsets, mask = _offsets(sample, positions, heads, valid, n_pos, n_heads, 3, F_PAD, D_PAD, HEAD_DIM, N_FRAMES)
    part = n_heads * HEAD_DIM  # distance from q to k to v of one token and head
    q = tl.load(qkv_ptr + offsets, mask=mask, other=0.0)
    k = tl.load(qkv_ptr + offsets + part, mask=mask, other=0.0)
    v = tl.load(qkv_ptr + offsets + 2 * part, mask=mask, other=0.0)

    s = _scores(q, k, sm_scale, F_PAD, N_FRAMES, PRECISION, UPCAST)  # (PAIRS, F_PAD, F_PAD)
    row_max = tl.max(s, axis=2)
    p = tl.exp(s - row_max[:, :, None])
    row_sum = tl.sum(p, axis=2)
    out = _dot(_cast(p, v.dtype, UPCAST), v, PRECISION, UPCAST) / row_sum[:, :, None]  # (PAIRS, F_PAD, D_PAD) fp32

    out_offsets, _ = _offsets(sample, positions, heads, valid, n_pos, n_heads, 1, F_PAD, D_PAD, HEAD_DIM, N_FRAMES)
    tl.store(out_ptr + out_offsets, _cast(out, out_ptr.dtype.element_ty, UPCAST), mask=mask)
    lse_offsets, lse_mask = _lse_offsets(sample, positions, heads, valid, n_pos, n_heads, F_PAD, N_FRAMES)
    tl.store(lse_ptr + lse_offsets, row_max + tl.log(row_sum), mask=lse_mask)


@triton.jit
def _temporal_bwd_kernel(
    qkv_ptr, out_ptr, dout_ptr, lse_ptr, dqkv_ptr, n_pos, n_heads, sm_scale,
    BLOCK_S: tl.constexpr, HEADS: tl.constexpr, F_PAD: tl.constexpr, D_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    N_FRAMES: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    sample = tl.program_id(0)
    positions, heads, valid = _pairs(n_pos, n_heads, BLOCK_S, HEADS)
    offsets, mask = _offsets(sample, positions, heads, valid, n_pos, n_heads, 3, F_PAD, D_PAD, HEAD_DIM, N_FRAMES)
    out_offsets, _ = _offsets(sample, positions, heads, valid, n_pos, n_heads, 1, F_PAD, D_PAD, HEAD_DIM, N_FRAMES)
    part = n_heads * HEAD_DIM
    q = tl.load(qkv_ptr + offsets, mask=mask, other=0.0)
    k = tl.load(qkv_ptr + offsets + part, mask=mask, other=0.0)
    v = tl.load(qkv_ptr + offsets + 2 * part, mask=mask, other=0.0)
    dout = tl.load(dout_ptr + out_offsets, mask=mask, other=0.0)
    out = tl.load(out_ptr + out_offsets, mask=mask, other=0.0)
    lse_offsets, lse_mask = _lse_offsets(sample, positions, heads, valid, n_pos, n_heads, F_PAD, N_FRAMES)
    lse = tl.load(lse_ptr + lse_offsets, mask=lse_mask, other=0.0)  # (PAIRS, F_PAD)

    # P from the saved logsumexp; padded query rows (frames past F) have q = 0 and lse = 0: their P is finite and
    # their dout is 0, so they add nothing below.
    s = _scores(q, k, sm_scale, F_PAD, N_FRAMES, PRECISION, UPCAST)
    p = tl.exp(s - lse[:, :, None])  # (PAIRS, F_PAD, F_PAD)
    delta = tl.sum(dout.to(tl.float32) * out.to(tl.float32), axis=2)  # (PAIRS, F_PAD): rowsum(dO * O)
    dv = _dot(_cast(tl.permute(p, (0, 2, 1)), dout.dtype, UPCAST), dout, PRECISION, UPCAST)
    dp = _dot(dout, tl.permute(v, (0, 2, 1)), PRECISION, UPCAST)  # (PAIRS, F_PAD, F_PAD)
    # dS stays fp32 (TF32 dots for 16-bit inputs): rounding it to bf16, as flash-attention does, doubles the dq/dk
    # error at head dim 88 past the 2x rule; the kernel is memory-bound, so the wider dots cost no time.
    ds = p * (dp - delta[:, :, None]) * sm_scale
    dq = _dot(ds, k.to(tl.float32), PRECISION, UPCAST)
    dk = _dot(tl.permute(ds, (0, 2, 1)), q.to(tl.float32), PRECISION, UPCAST)
    tl.store(dqkv_ptr + offsets, _cast(dq, dqkv_ptr.dtype.element_ty, UPCAST), mask=mask)
    tl.store(dqkv_ptr + offsets + part, _cast(dk, dqkv_ptr.dtype.element_ty, UPCAST), mask=mask)
    tl.store(dqkv_ptr + offsets + 2 * part, _cast(dv, dqkv_ptr.dtype.element_ty, UPCAST), mask=mask)


# ------------------------------------------------------------------------------------------------ launchers


def check_qkv(qkv: torch.Tensor, frames: int) -> torch.Tensor:
    """qkv must be [B*F, S, 3, heads, dim] with 1 <= F <= MAX_FRAMES; returns it contiguous."""
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"temporal_attention: qkv must be [B*F, S, 3, heads, dim], got {tuple(qkv.shape)}")
    if not 1 <= frames <= MAX_FRAMES or qkv.shape[0] % frames:
        raise ValueError(f"temporal_attention: frames={frames} must be in 1..{MAX_FRAMES} and divide qkv's "
                         f"{qkv.shape[0]} rows (B*F)")
    if qkv.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"temporal_attention: qkv dtype {qkv.dtype}; expected fp32, fp16 or bf16")
    return qkv.contiguous()


def launch_config(qkv: torch.Tensor, frames: int, backward: bool = False) -> dict:
    """Tiles: HEADS adjacent heads x BLOCK_S positions per program, each an F x dim tile; fp32 dots run in IEEE fp32
    (not TF32) to stay exact. Not yet tuned on a GPU: about 4K elements per tile (PAIRS x F_PAD x D_PAD), heads
    first (their rows are contiguous in memory), and twice the warps in backward, which holds ~10 such tiles."""
    f_pad, d_pad = padded(frames), padded(qkv.shape[-1])
    # fp32 backward runs its dots on FMA with ~10 fp32 tiles live: at 4K elements it spilled 200 B at Latte's F=16,
    # dim 72 (255 registers); 2K does not (bench/compile_check.py, sm_90a)
    elements = 2048 if backward and qkv.dtype == torch.float32 else 4096
    pairs = max(1, min(16, elements // (f_pad * d_pad)))
    heads = min(pairs, triton.next_power_of_2(qkv.shape[3]))
    return dict(BLOCK_S=pairs // heads, HEADS=heads, F_PAD=f_pad, D_PAD=d_pad, HEAD_DIM=qkv.shape[-1],
                N_FRAMES=frames, PRECISION="ieee" if qkv.dtype == torch.float32 else "tf32",
                UPCAST=target_of(qkv.device).interpreted, num_warps=8 if backward else 4)


def _grid(qkv, frames, config):
    rows, positions, _, heads, _ = qkv.shape
    return rows // frames, triton.cdiv(positions, config["BLOCK_S"]), triton.cdiv(heads, config["HEADS"])


def temporal_forward(qkv: torch.Tensor, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, positions, _, heads, dim = qkv.shape
    out = torch.empty(rows, positions, heads, dim, dtype=qkv.dtype, device=qkv.device)
    lse = torch.empty(rows, positions, heads, dtype=torch.float32, device=qkv.device)
    config = launch_config(qkv, frames)
    launch(_temporal_fwd_kernel, _grid(qkv, frames, config))(
        qkv, out, lse, positions, heads, 1.0 / math.sqrt(dim), **config)
    return out, lse


def temporal_backward(qkv, out, dout, lse, frames: int) -> torch.Tensor:
    rows, positions, _, heads, dim = qkv.shape
    dqkv = torch.empty_like(qkv)
    config = launch_config(qkv, frames, backward=True)
    launch(_temporal_bwd_kernel, _grid(qkv, frames, config))(
        qkv, out, dout, lse, dqkv, positions, heads, 1.0 / math.sqrt(dim), **config)
    return dqkv
