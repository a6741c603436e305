"""The transformer blocks' feed-forward: Linear, GELU-tanh, Linear (DiT / Latte)."""
import torch
from torch import nn

from ristretto.kernels.gelu_mlp import gelu_mlp


class Mlp(nn.Module):
    """Linear, GELU-tanh, Linear; backward recomputes the GELU instead of keeping its output (kernels/gelu_mlp.py)."""

    def __init__(self, hidden_size: int, mlp_ratio: float):
        super().__init__()
        inner = int(hidden_size * mlp_ratio)
        self.fc1 = nn.Linear(hidden_size, inner)
        self.fc2 = nn.Linear(inner, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_mlp(x, self.fc1, self.fc2)  # (N, S, D)
