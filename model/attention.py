"""Self- and cross-attention modules. The attention function itself comes through the seam (kernels/attention.py):
`engine.build.apply_attention_backend` sets `attention_fn` on every module from outside."""
import torch
from torch import nn

from ristretto.kernels.attention import sdpa_attention

from .layout import expand_rows


class SelfAttention(nn.Module):
    """Multi-head self-attention over the middle axis of [N, S, D] (tokens of a frame, or frames of a patch)."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.attention_fn = sdpa_attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, length, dim = x.shape
        q, k, v = self.qkv(x).view(rows, length, 3, self.num_heads, dim // self.num_heads).unbind(2)  # (N, S, h, d)
        out = self.attention_fn(q, k, v)  # (N, S, h, d)
        return self.proj(out.reshape(rows, length, dim))


class CrossAttention(nn.Module):
    """Tokens [N, S, D] attend to caption tokens [M, L, D] (M divides N: one caption per sample or per frame)."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(hidden_size, hidden_size)
        self.kv = nn.Linear(hidden_size, 2 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.attention_fn = sdpa_attention

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None) -> torch.Tensor:
        rows, length, dim = x.shape
        head_dim = dim // self.num_heads
        q = self.q(x).view(rows, length, self.num_heads, head_dim)  # (N, S, h, d)
        # Project the caption once per group, then share it with the group's rows (frames of one sample).
        kv = expand_rows(self.kv(context), rows)  # (N, L, 2D)
        k, v = kv.view(rows, context.shape[1], 2, self.num_heads, head_dim).unbind(2)  # (N, L, h, d)
        mask = None if context_mask is None else expand_rows(context_mask, rows)  # (N, L)
        out = self.attention_fn(q, k, v, mask)
        return self.proj(out.reshape(rows, length, dim))

