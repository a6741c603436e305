"""Where a block's adaLN shift/scale/gate vectors come from.

adaLN-single (Latte-1 / PixArt-alpha): one timestep MLP for the whole model emits [B, n*D]; each block adds its own
learned table [n, D]. adaLN-Zero (DiT / Latte-XL): each block maps the condition [B, D] through SiLU + Linear,
zero-initialised so every block starts as the identity. Both return n vectors of shape [B, D].
"""
import torch
from torch import nn


class AdaLNSingleTable(nn.Module):
    def __init__(self, num_vectors: int, hidden_size: int):
        super().__init__()
        self.num_vectors = num_vectors
        self.scale_shift_table = nn.Parameter(torch.randn(num_vectors, hidden_size) / hidden_size**0.5)

    def forward(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        batch, dim = cond.shape[0], self.scale_shift_table.shape[1]
        return (self.scale_shift_table[None] + cond.view(batch, -1, dim)).unbind(1)  # n x (B, D)


class AdaLNSingleCaption(AdaLNSingleTable):
    """adaLN-single plus a per-block projection of the pooled caption (zero-initialised, as adaLN-Zero): the
    condition is [B, n*D + D] (timestep vectors, then the pooled caption). Each block then reads the caption in its
    own way, which small text-to-video models need to turn words like "left" into layout and motion."""

    def __init__(self, num_vectors: int, hidden_size: int):
        super().__init__(num_vectors, hidden_size)
        self.caption = nn.Linear(hidden_size, num_vectors * hidden_size)

    def forward(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        batch, dim = cond.shape[0], self.scale_shift_table.shape[1]
        timestep, caption = cond[:, :-dim], cond[:, -dim:]
        from_caption = self.caption(nn.functional.silu(caption)).view(batch, self.num_vectors, dim)
        return (self.scale_shift_table[None] + timestep.view(batch, -1, dim) + from_caption).unbind(1)


class AdaLNZero(nn.Module):
    def __init__(self, num_vectors: int, hidden_size: int):
        super().__init__()
        self.num_vectors = num_vectors
        self.linear = nn.Linear(hidden_size, num_vectors * hidden_size)

    def forward(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(nn.functional.silu(cond)).view(cond.shape[0], self.num_vectors, -1).unbind(1)
