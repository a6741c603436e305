"""The transformer blocks' feed-forward with its adaLN-modulated LayerNorm: LN-modulate, Linear, GELU-tanh, Linear."""
from functools import partial

import torch
from torch import nn

from ristretto.kernels.gelu_mlp import modulated_gelu_mlp
from ristretto.kernels.registry import TORCH_KERNELS


class Mlp(nn.Module):
    """LN(x) * (1 + scale) + shift, then Linear, GELU-tanh, Linear. Backward recomputes the LN-modulate and the GELU
    instead of keeping their outputs (kernels/gelu_mlp.py): the MLP keeps the residual x and one hidden tensor."""

    def __init__(self, hidden_size: int, mlp_ratio: float, eps: float = 1e-6):
        super().__init__()
        inner = int(hidden_size * mlp_ratio)
        self.eps = eps
        self.fc1 = nn.Linear(hidden_size, inner)
        self.fc2 = nn.Linear(inner, hidden_size)
        self.kernels = TORCH_KERNELS

    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        norm = partial(self.kernels.layernorm_modulate, eps=self.eps)
        return modulated_gelu_mlp(x, shift, scale, norm, self.fc1, self.fc2)  # (N, S, D)
