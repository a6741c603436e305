"""Latte's transformer blocks. One block class serves spatial and temporal positions and both conditionings:
what differs is the modulation module (adaLN-single or adaLN-Zero) and whether a cross-attention is present
(spatial blocks of the text-to-video model). Fused ops come through the modules' `kernels` (the kernels seam)."""
import torch
from torch import nn

from ristretto.kernels.registry import TORCH_KERNELS

from .attention import CrossAttention, SelfAttention, TemporalSelfAttention
from .mlp import Mlp


class LatteBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, modulation: nn.Module,
                 cross_attention: bool, eps: float = 1e-6, temporal: bool = False):
        super().__init__()
        self.modulation = modulation  # -> shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, each (B, D)
        self.attn = (TemporalSelfAttention if temporal else SelfAttention)(hidden_size, num_heads, eps)
        self.cross_attn = CrossAttention(hidden_size, num_heads) if cross_attention else None
        self.mlp = Mlp(hidden_size, mlp_ratio, eps)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        # x: (N, S, D), all frames (spatial block) or the video frames (temporal block); cond: (B, .), N = B * frames.
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(cond)  # each (B, D)
        # Each branch is one module with its LN-modulate and gated residual inside, keeping for backward only what
        # its matmuls need (model/attention.py, model/mlp.py).
        x = self.attn(x, shift_msa, scale_msa, gate_msa, samples=cond.shape[0])
        if self.cross_attn is not None:
            x = x + self.cross_attn(x, context, context_mask)  # PixArt: no norm, no gate before cross-attention
        return self.mlp(x, shift_mlp, scale_mlp, gate_mlp)  # (N, S, D)


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear to p*p*C_out features per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, modulation: nn.Module, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.modulation = modulation  # -> shift, scale, each (B, D)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.kernels = TORCH_KERNELS

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(cond)
        return self.linear(self.kernels.layernorm_modulate(x, shift, scale, self.eps))
