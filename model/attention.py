"""Self-, temporal and cross-attention modules. The attention functions come through the seam (kernels/attention.py):
`engine.build.apply_attention_backend` sets `attention_fn` (and `temporal_attention_fn`) on the modules from outside.
"""
from typing import Callable

import torch
from torch import nn

from ristretto.kernels.attention import packed_self_attention, sdpa_attention

from .layout import frame_sequences, frames_from_sequences

# (qkv [B*F, S, 3, heads, dim], frames F, project: the output projection) -> projected output [B*F, S, D]
TemporalAttentionFn = Callable[[torch.Tensor, int, Callable], torch.Tensor]


def attention_over_frames(attention_fn) -> TemporalAttentionFn:
    """Temporal attention through a (q, k, v) attention backend: q, k, v regrouped into [B*S, F] frame sequences, the
    output projected in that layout and put back in the spatial layout. Projecting before the move means the copy
    is of the projection's output, which autograd does not keep (the projection keeps its input, a view of the
    attention output the backend keeps anyway)."""
    def temporal_attention(qkv: torch.Tensor, frames: int, project: Callable) -> torch.Tensor:
        q, k, v = frame_sequences(qkv, frames)  # each (B*S, F, h, d)
        out = project(attention_fn(q, k, v).flatten(-2))  # (B*S, F, D)
        return frames_from_sequences(out, qkv.shape[1])  # (B*F, S, D)

    return temporal_attention


def attention_in_spatial_layout(kernel) -> TemporalAttentionFn:
    """Temporal attention by a kernel that reads qkv and writes its output in the spatial layout (no copies)."""
    def temporal_attention(qkv: torch.Tensor, frames: int, project: Callable) -> torch.Tensor:
        return project(kernel(qkv, frames).flatten(-2))  # (B*F, S, D)

    return temporal_attention


class SelfAttention(nn.Module):
    """Multi-head self-attention among the S tokens of each frame: x [N, S, D] -> [N, S, D]."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.attention_fn = sdpa_attention

    def forward(self, x: torch.Tensor, samples: int) -> torch.Tensor:
        # samples (B) is what temporal attention needs to find the frames; attention within a frame does not
        rows, length, dim = x.shape
        qkv = self.qkv(x).view(rows, length, 3, self.num_heads, dim // self.num_heads)  # (N, S, 3, h, d)
        out = packed_self_attention(self.attention_fn, qkv)  # (N, S, h, d)
        return self.proj(out.reshape(rows, length, dim))


class TemporalSelfAttention(SelfAttention):
    """Multi-head self-attention among the F frames of each patch position, read and written in the spatial layout:
    x [B*F, S, D] (the video rows) -> [B*F, S, D]. Same parameters as SelfAttention."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__(hidden_size, num_heads)
        self.temporal_attention_fn: TemporalAttentionFn = attention_over_frames(sdpa_attention)

    def forward(self, x: torch.Tensor, samples: int) -> torch.Tensor:
        rows, length, dim = x.shape
        qkv = self.qkv(x).view(rows, length, 3, self.num_heads, dim // self.num_heads)  # (B*F, S, 3, h, d)
        return self.temporal_attention_fn(qkv, rows // samples, self.proj)  # (B*F, S, D)


class CrossAttention(nn.Module):
    """Tokens [N, S, D] attend to caption tokens [M, L, D], M dividing N (one caption per sample, or per frame).

    The caption's K/V are computed once per caption and never repeated: the N / M frames that share a caption attend
    as one sequence of (N / M) * S queries (a free view), which gives the same result as attending frame by frame."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(hidden_size, hidden_size)
        self.kv = nn.Linear(hidden_size, 2 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.attention_fn = sdpa_attention

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None) -> torch.Tensor:
        rows, length, dim = x.shape
        captions, caption_length, head_dim = context.shape[0], context.shape[1], dim // self.num_heads
        q = self.q(x).view(captions, -1, self.num_heads, head_dim)  # (M, N/M * S, h, d)
        k, v = self.kv(context).view(captions, caption_length, 2, self.num_heads, head_dim).unbind(2)  # (M, L, h, d)
        out = self.attention_fn(q, k, v, context_mask)  # (M, N/M * S, h, d)
        return self.proj(out.reshape(rows, length, dim))

