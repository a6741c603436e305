"""The transformer blocks' MLP branch with its adaLN modulation and gated residual:
x + gate * fc2(GELU_tanh(fc1(LN(x) * (1 + scale) + shift)))."""
import torch
from torch import nn

from ristretto.kernels.gelu_mlp import gated_mlp
from ristretto.kernels.registry import TORCH_KERNELS


class Mlp(nn.Module):
    """Linear, GELU-tanh, Linear, with the LN-modulate before and the gated residual after, as one op
    (kernels/gelu_mlp.py): backward recomputes the LN-modulate and the GELU, and derives the gate's gradient from
    fc2's weight gradient, so the branch keeps only the residual x and one hidden tensor."""

    def __init__(self, hidden_size: int, mlp_ratio: float, eps: float = 1e-6):
        super().__init__()
        inner = int(hidden_size * mlp_ratio)
        self.eps = eps
        self.fc1 = nn.Linear(hidden_size, inner)
        self.fc2 = nn.Linear(inner, hidden_size)
        self.kernels = TORCH_KERNELS

    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return gated_mlp(x, shift, scale, gate, self.fc1, self.fc2, self.kernels, self.eps)  # (N, S, D)
