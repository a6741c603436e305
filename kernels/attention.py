"""The attention seam: one `attention(q, k, v, mask)` function per backend, chosen once at build time.

Contract shared by every backend:
    q [N, Sq, heads, dim], k and v [N, Sk, heads, dim] (the "BSHD" layout flash-attention wants),
    mask None or bool [N, Sk] (True = attend; padding = False) -> out [N, Sq, heads, dim].
Spatial attention calls it with N = B*F, S = H*W; temporal with N = B*H*W, S = F (see model/layout.py).
"""
from typing import Callable

import torch
import torch.nn.functional as F

AttentionFn = Callable[..., torch.Tensor]


def sdpa_attention(q, k, v, mask=None):
    """torch scaled_dot_product_attention; torch picks flash / cuDNN / efficient / math."""
    bias = None if mask is None else mask[:, None, None, :]  # (N, 1, 1, Sk) broadcast over heads and queries
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias)
    return out.transpose(1, 2)


ATTENTION_BACKENDS = {"sdpa": sdpa_attention}


def attention_backend(name: str) -> AttentionFn:
    """The attention function called `name`."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"model.attention_backend: unknown backend {name!r}; expected one of {sorted(ATTENTION_BACKENDS)}")
    return ATTENTION_BACKENDS[name]
