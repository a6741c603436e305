"""Pure-torch twins of every Triton kernel: the ground truth for tests and the CPU path (`kernels = "torch"`).

Broadcast rule shared by all ops: per-group vectors (`shift`, `scale`, `gate`) have shape [M, D] for activations
[N, S, D] with N divisible by M; row n of the activations uses vector n // (N // M). This covers both
Latte layouts without copies: spatial tokens [B*F, H*W, D] and temporal tokens [B*H*W, F, D] with M = B
(per sample), or M = B*F in the spatial layout (per sample-and-frame).
"""
import torch
import torch.nn.functional as F


def expand_groups(vector: torch.Tensor, rows: int) -> torch.Tensor:
    """[M, D] per-group vectors -> [rows, 1, D], repeating each group rows // M times."""
    groups = vector.shape[0]
    if rows % groups:
        raise ValueError(f"activation rows ({rows}) must be a multiple of the vector's groups ({groups})")
    return vector.repeat_interleave(rows // groups, dim=0).unsqueeze(1)


def layernorm_modulate(x, shift, scale, eps: float = 1e-6, upcast: bool = False):
    """LN(x) without affine, then adaLN modulation: LN(x) * (1 + scale) + shift.   x [N, S, D], shift/scale [M, D]."""
    dtype = x.dtype
    if upcast:
        x, shift, scale = x.double(), shift.double(), scale.double()
    normed = F.layer_norm(x.float() if not upcast else x, x.shape[-1:], eps=eps).to(x.dtype)
    out = normed * (1 + expand_groups(scale, x.shape[0])) + expand_groups(shift, x.shape[0])
    return out if upcast else out.to(dtype)


def gate_residual(residual, gate, y, upcast: bool = False):
    """residual + gate * y.   residual, y [N, S, D], gate [M, D]."""
    if upcast:
        residual, gate, y = residual.double(), gate.double(), y.double()
    return residual + expand_groups(gate, residual.shape[0]) * y


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, (H/p)*(W/p), C*p*p], each token's features in (C, p, p) order like a Conv2d weight."""
    n, c, h, w = x.shape
    if h % patch or w % patch:
        raise ValueError(f"x: H={h} and W={w} must be multiples of patch={patch}")
    x = x.reshape(n, c, h // patch, patch, w // patch, patch)  # (N, C, h, p, w, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(n, (h // patch) * (w // patch), c * patch * patch)


def patch_embed(x, weight, bias, pos_embed, patch: int, upcast: bool = False):
    """Conv2d(kernel=stride=patch) as a GEMM over patches, plus bias and a fixed position table.

    x [N, C, H, W], weight [D, C, p, p], bias [D], pos_embed [(H/p)*(W/p), D] or None -> tokens [N, (H/p)*(W/p), D].
    """
    if upcast:
        x, weight, bias = x.double(), weight.double(), bias.double()
        pos_embed = pos_embed.double() if pos_embed is not None else None
    tokens = patchify(x, patch) @ weight.reshape(weight.shape[0], -1).t() + bias
    return tokens if pos_embed is None else tokens + pos_embed.to(tokens.dtype)


def temporal_attention(qkv, frames: int, upcast: bool = False):
    """Attention over the F frames of each spatial position (twin of kernels/temporal_attention.py).

    qkv [B*F, S, 3, heads, dim] in the spatial layout (row b*F + f = frame f of sample b) -> [B*F, S, heads, dim].
    Scores and softmax in qkv's dtype (fp64 with upcast), like an unfused attention.
    """
    dtype = qkv.dtype
    if upcast:
        qkv = qkv.double()
    rows, positions, _, heads, dim = qkv.shape
    q, k, v = qkv.view(rows // frames, frames, positions, 3, heads, dim).unbind(3)  # each (B, F, S, h, d)
    scores = torch.einsum("bishd,bjshd->bshij", q, k) / dim**0.5  # (B, S, h, F, F)
    out = torch.einsum("bshij,bjshd->bishd", scores.softmax(dim=-1), v)  # (B, F, S, h, d)
    out = out.reshape(rows, positions, heads, dim)
    return out if upcast else out.to(dtype)
