"""Self-, temporal and cross-attention modules. The attention functions come through the seam (kernels/attention.py):
`engine.build.apply_attention_backend` sets `attention_fn` (and `temporal_attention_fn`) on the modules from outside.

Self- and temporal attention are the block's whole attention branch, x + gate * proj(attention(qkv(LN-modulate(x)))),
built from two lean ops (kernels/lean_linear.py) around the attention call: LN-modulate + qkv keeps x, not the
normalised input; proj + gated residual keeps the attention output (which the attention keeps anyway), not the
projection's output. With q, k, v and the attention's output and logsumexp, that is all the branch keeps.
"""
from typing import Callable

import torch
from torch import nn

from ristretto.kernels.attention import packed_self_attention, sdpa_attention
from ristretto.kernels.lean_linear import RowLayout, gated_projection, modulated_linear
from ristretto.kernels.registry import TORCH_KERNELS

from .layout import frame_sequences, frames_from_sequences, sequences_from_frames

# project(attention output [R, T, D], its layout: None = the spatial rows [B*F, S, D], or a RowLayout to them)
#   -> the projected output in the spatial rows (the attention branch: proj, gate and residual)
Project = Callable[[torch.Tensor, RowLayout | None], torch.Tensor]
# (qkv [B*F, S, 3, heads, dim], frames F, project) -> project's result [B*F, S, D]
TemporalAttentionFn = Callable[[torch.Tensor, int, Project], torch.Tensor]


def frame_sequence_layout(frames: int, tokens: int) -> RowLayout:
    """Frame sequences [B*S, F, D] <-> the spatial rows [B*F, S, D] (copies)."""
    return RowLayout(lambda t: frames_from_sequences(t, tokens), lambda t: sequences_from_frames(t, frames))


def attention_over_frames(attention_fn) -> TemporalAttentionFn:
    """Temporal attention through a (q, k, v) attention backend: q, k, v regrouped into [B*S, F] frame sequences and
    the output handed to `project` in that layout. Projecting before the move means the copy back is of the
    projection's output, which nothing keeps (the projection keeps its input, a view of the attention output the
    backend keeps anyway)."""
    def temporal_attention(qkv: torch.Tensor, frames: int, project: Project) -> torch.Tensor:
        q, k, v = frame_sequences(qkv, frames)  # each (B*S, F, h, d)
        out = attention_fn(q, k, v).flatten(-2)  # (B*S, F, D)
        return project(out, frame_sequence_layout(frames, qkv.shape[1]))  # (B*F, S, D)

    return temporal_attention


def attention_in_spatial_layout(kernel) -> TemporalAttentionFn:
    """Temporal attention by a kernel that reads qkv and writes its output in the spatial layout (no copies)."""
    def temporal_attention(qkv: torch.Tensor, frames: int, project: Project) -> torch.Tensor:
        return project(kernel(qkv, frames).flatten(-2), None)  # (B*F, S, D)

    return temporal_attention


class SelfAttention(nn.Module):
    """The attention branch with multi-head self-attention among the S tokens of each frame:
    x [N, S, D], shift/scale/gate [B, D] (adaLN vectors) -> x + gate * proj(attention(qkv(LN-modulate(x))))."""

    def __init__(self, hidden_size: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.eps = eps
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.attention_fn = sdpa_attention
        self.kernels = TORCH_KERNELS

    def qkv_of(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """qkv(LN-modulate(x)) as [N, S, 3, heads, dim], keeping only x for backward."""
        rows, length, dim = x.shape
        qkv = modulated_linear(x, shift, scale, self.qkv, self.kernels, self.eps)
        return qkv.view(rows, length, 3, self.num_heads, dim // self.num_heads)

    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor,
                samples: int) -> torch.Tensor:
        # samples (B) is what temporal attention needs to find the frames; attention within a frame does not
        out = packed_self_attention(self.attention_fn, self.qkv_of(x, shift, scale))  # (N, S, h, d)
        return gated_projection(x, gate, out.reshape(x.shape), self.proj, self.kernels)  # (N, S, D)


class TemporalSelfAttention(SelfAttention):
    """The attention branch with multi-head self-attention among the F frames of each patch position, read and
    written in the spatial layout: x [B*F, S, D] (the video rows) -> [B*F, S, D]. Same parameters as SelfAttention."""

    def __init__(self, hidden_size: int, num_heads: int, eps: float = 1e-6):
        super().__init__(hidden_size, num_heads, eps)
        self.temporal_attention_fn: TemporalAttentionFn = attention_over_frames(sdpa_attention)

    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor,
                samples: int) -> torch.Tensor:
        def project(out: torch.Tensor, layout: RowLayout | None) -> torch.Tensor:
            return gated_projection(x, gate, out, self.proj, self.kernels, layout)

        return self.temporal_attention_fn(self.qkv_of(x, shift, scale), x.shape[0] // samples, project)


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

