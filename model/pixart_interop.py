"""Start a Latte video model from a diffusers `PixArtTransformer2DModel` (PixArt-alpha / -Sigma), as Latte did.

PixArt-alpha's blocks are Latte-1's spatial blocks, key for key (cross-attention, adaLN-single), and its patch
embedding, timestep / caption embedders and final layer are Latte-1's too: `spatial_state_from_pixart` maps them
onto our spatial blocks (blocks[2i] <- transformer_blocks[i]). `identity_temporal_blocks` zeroes each temporal
block's two output projections, so a temporal block adds nothing and the video model equals the image model on
each frame, apart from the fixed temporal position table Latte (and diffusers' Latte) adds after the first spatial
block, which no weight can cancel. Training then grows temporal mixing from zero (adaLN-Zero's idea).
"""
import torch
from torch import nn

from .diffusers_interop import block_from_diffusers, diffusers_depth, top_level_from_diffusers
from .embeddings import timestep_features

SIZE_EMBEDDERS = ("adaln_single.emb.resolution_embedder", "adaln_single.emb.aspect_ratio_embedder")


def spatial_state_from_pixart(state: dict[str, torch.Tensor], height: int, width: int) -> dict[str, torch.Tensor]:
    """A PixArt state dict -> our keys for everything but the temporal blocks. PixArt-alpha 1024's size conditioning
    (resolution and aspect-ratio embeddings added to the timestep embedding) is a constant for a fixed training size
    of height x width pixels, so it is folded into the timestep embedder's last bias: exact at that size."""
    if f"{SIZE_EMBEDDERS[0]}.linear_1.weight" in state:
        state = fold_size_conditions(state, height, width)
    out = top_level_from_diffusers(state)
    for layer in range(diffusers_depth(state)):
        out.update(block_from_diffusers(state, 2 * layer, f"transformer_blocks.{layer}"))
    return out


def fold_size_conditions(state: dict[str, torch.Tensor], height: int, width: int) -> dict[str, torch.Tensor]:
    """PixArtAlphaCombinedTimestepSizeEmbeddings at resolution (height, width), aspect ratio height / width, added to
    timestep_embedder.linear_2's bias; the size embedders' keys are removed."""
    def embed(prefix: str, values: list[float]) -> torch.Tensor:  # TimestepEmbedding of sinusoidal features
        features = timestep_features(torch.tensor(values, dtype=torch.float32)).to(torch.float64)
        hidden = nn.functional.silu(features @ state[f"{prefix}.linear_1.weight"].double().T
                                    + state[f"{prefix}.linear_1.bias"].double())
        return (hidden @ state[f"{prefix}.linear_2.weight"].double().T + state[f"{prefix}.linear_2.bias"].double())

    size = torch.cat([embed(SIZE_EMBEDDERS[0], [height, width]).reshape(-1),
                      embed(SIZE_EMBEDDERS[1], [height / width]).reshape(-1)])  # (D,)
    out = {k: v for k, v in state.items() if not k.startswith(SIZE_EMBEDDERS)}
    bias = "adaln_single.emb.timestep_embedder.linear_2.bias"
    out[bias] = (state[bias].double() + size).to(state[bias].dtype)
    return out


@torch.no_grad()
def identity_temporal_blocks(model: nn.Module) -> None:
    """Zero every temporal block's attention output projection and second MLP linear: with adaLN-single the gates
    are shared with the spatial blocks, so the outputs, not the gates, are what can start at zero."""
    for block in model.blocks[1::2]:
        for linear in (block.attn.proj, block.mlp.fc2):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

