"""Embeddings: video patches, timesteps, captions and class labels, plus the fixed sin-cos position tables.

The sin-cos tables follow diffusers/MAE exactly (checked by tests/model/test_diffusers_interop.py).
"""
import math

import torch
from torch import nn

from ristretto.kernels.registry import TORCH_KERNELS


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[M] positions -> [M, dim] table: sin of each frequency, then cos (MAE order), computed in float64."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = torch.outer(positions.reshape(-1).double(), omega)  # (M, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int, base_size: int, interpolation_scale: float = 1.0) -> torch.Tensor:
    """[grid_h * grid_w, dim] table, row-major tokens; first half encodes the column (x), second half the row (y)."""
    rows = torch.arange(grid_h, dtype=torch.float32) / (grid_h / base_size) / interpolation_scale
    cols = torch.arange(grid_w, dtype=torch.float32) / (grid_w / base_size) / interpolation_scale
    col_grid, row_grid = torch.meshgrid(cols, rows, indexing="xy")  # each (grid_h, grid_w)
    return torch.cat([sincos_1d(dim // 2, col_grid), sincos_1d(dim // 2, row_grid)], dim=1).float()


def timestep_features(timesteps: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[B] timesteps -> [B, dim] features: cos then sin over geometric frequencies (flip_sin_to_cos, shift 0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    angles = timesteps.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class PatchEmbed(nn.Module):
    """Frames [N, C, H, W] -> tokens [N, (H/p)*(W/p), D]: a Conv2d(kernel=stride=p) plus fixed 2-D sin-cos positions."""

    def __init__(self, sample_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.base_size = sample_size // patch_size
        self.interpolation_scale = max(sample_size // 64, 1)
        self.weight = nn.Parameter(torch.empty(hidden_size, in_channels, patch_size, patch_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        table = sincos_2d(hidden_size, self.base_size, self.base_size, self.base_size, self.interpolation_scale)
        self.register_buffer("pos_embed", table, persistent=False)
        self.kernels = TORCH_KERNELS

    def position_table(self, grid_h: int, grid_w: int) -> torch.Tensor:
        if (grid_h, grid_w) == (self.base_size, self.base_size):
            return self.pos_embed
        table = sincos_2d(self.pos_embed.shape[1], grid_h, grid_w, self.base_size, self.interpolation_scale)
        return table.to(self.pos_embed.device)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        grid_h, grid_w = frames.shape[-2] // self.patch_size, frames.shape[-1] // self.patch_size
        pos = self.position_table(grid_h, grid_w)
        return self.kernels.patch_embed(frames, self.weight, self.bias, pos, self.patch_size)


class TimestepEmbedder(nn.Module):
    """[B] timesteps -> [B, D]: sinusoidal features then a two-layer SiLU MLP (DiT / PixArt)."""

    def __init__(self, hidden_size: int, feature_dim: int = 256):
        super().__init__()
        self.feature_dim = feature_dim
        self.mlp = nn.Sequential(nn.Linear(feature_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        features = timestep_features(timesteps, self.feature_dim)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class CaptionProjection(nn.Module):
    """Text-encoder embeddings [B, L, Cc] -> [B, L, D] (PixArt-alpha: Linear, GELU-tanh, Linear)."""

    def __init__(self, caption_channels: int, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(caption_channels, hidden_size), nn.GELU(approximate="tanh"),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.mlp(caption)


class LabelEmbedder(nn.Module):
    """Class labels [B] -> [B, D]; index num_classes is the null class that classifier-free guidance samples with."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.table(labels)
