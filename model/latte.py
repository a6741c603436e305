"""The Latte video diffusion transformer (Ma et al. 2024), in plain PyTorch.

Tokens alternate between a spatial block (attention within each frame) and a temporal block (attention across
frames at each patch position). The text-to-video variant (Latte-1) cross-attends to caption tokens and uses
adaLN-single; the class-conditional variant (Latte-XL) uses adaLN-Zero. Kernels, attention backend, precision and
activation checkpointing are applied from outside (engine/build.py); this file has no backend switches.
"""
import torch
from torch import nn

from .blocks import FinalLayer, LatteBlock
from .conditioning import ClassConditioning, TextConditioning
from .embeddings import PatchEmbed, sincos_1d
from .layout import add_frame_embedding, unpatchify, video_rows, with_image_rows
from .modulation import AdaLNSingleCaption, AdaLNZero


class Latte(nn.Module):
    def __init__(self, conditioning: nn.Module, in_channels: int, out_channels: int, sample_size: int,
                 frames: int, patch_size: int, hidden_size: int, depth: int, num_heads: int,
                 mlp_ratio: float = 4.0, eps: float = 1e-6):
        super().__init__()
        self.in_channels, self.out_channels, self.patch_size = in_channels, out_channels, patch_size
        self.conditioning = conditioning
        self.patch_embed = PatchEmbed(sample_size, patch_size, in_channels, hidden_size)
        self.register_buffer("temporal_pos_embed", sincos_1d(hidden_size, torch.arange(frames)).float(),
                             persistent=False)
        # blocks[2i] is layer i's spatial block, blocks[2i+1] its temporal block (Latte's "interleaved" variant).
        self.blocks = nn.ModuleList(
            LatteBlock(hidden_size, num_heads, mlp_ratio, conditioning.modulation(6, hidden_size),
                       cross_attention=conditioning.has_context and index % 2 == 0, eps=eps, temporal=index % 2 == 1)
            for index in range(2 * depth)
        )
        # The residual stream's dtype between blocks (train.residual_dtype: bf16 halves every saved block input);
        # set from outside by engine/build.py, like the kernels.
        self.residual_dtype = torch.float32
        self.final_layer = FinalLayer(hidden_size, patch_size, out_channels, conditioning.modulation(2, hidden_size),
                                      eps=eps)
        self.initialize_weights()

    def initialize_weights(self):
        """All special initialisation in one place (DiT / PixArt-alpha)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.weight.shape[0], -1))
        for name, param in self.conditioning.named_parameters():
            if name.endswith("weight") and param.dim() == 2:  # timestep/caption MLPs, label table
                nn.init.normal_(param, std=0.02)
        for module in [*self.blocks, self.final_layer]:
            if isinstance(module.modulation, AdaLNZero):  # adaLN-Zero: every block starts as the identity
                nn.init.zeros_(module.modulation.linear.weight)
                nn.init.zeros_(module.modulation.linear.bias)
            if isinstance(module.modulation, AdaLNSingleCaption):  # the per-block caption path starts silent
                nn.init.zeros_(module.modulation.caption.weight)
                nn.init.zeros_(module.modulation.caption.bias)
        for block in self.blocks:
            if block.cross_attn is not None:
                nn.init.zeros_(block.cross_attn.proj.weight)  # PixArt: cross-attention starts silent
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, num_images: int = 0, **conditions) -> torch.Tensor:
        """x [B, F+I, C, H, W] (I image frames last), timestep [B], conditions: caption [B, L, Cc] + caption_mask
        [B, L] (+ image_caption [B, I, L, Cc], image_caption_mask) for text, or label [B] for class.
        Returns [B, F+I, C_out, H, W]."""
        batch, total_frames, _, height, width = x.shape
        video_frames = total_frames - num_images
        cond = self.conditioning(timestep, video_frames=video_frames, **conditions)
        tokens = self.patch_embed(x.flatten(0, 1)).to(self.residual_dtype)  # (B*(F+I), S, D)
        for layer, (spatial, temporal) in enumerate(zip(self.blocks[0::2], self.blocks[1::2])):
            tokens = spatial(tokens, cond.block, context=cond.context, context_mask=cond.context_mask)
            video = video_rows(tokens, batch, video_frames)  # (B*F, S, D): a view unless image frames follow
            if layer == 0 and video_frames > 1:
                video = add_frame_embedding(video, self.temporal_pos_embed[:video_frames], batch)
            tokens = with_image_rows(temporal(video, cond.block), tokens, batch, video_frames)  # (B*(F+I), S, D)
        out = self.final_layer(tokens, cond.final)  # (B*(F+I), S, p*p*C_out)
        return unpatchify(out, batch, self.patch_size, height, width)  # (B, F+I, C_out, H, W)


def latte_from_config(model_config, frames: int, sample_size: int) -> Latte:
    """Build the Latte variant a ModelConfig describes, for videos of `frames` frames of sample_size^2 latents."""
    cfg = model_config
    if cfg.kind == "t2v":
        conditioning = TextConditioning(cfg.hidden_size, cfg.caption_channels, cfg.pooled_caption, cfg.caption_adaln)
    else:
        conditioning = ClassConditioning(cfg.hidden_size, cfg.num_classes)
    out_channels = cfg.in_channels * (2 if cfg.learn_sigma else 1)
    return Latte(conditioning, cfg.in_channels, out_channels, sample_size, frames, cfg.patch_size, cfg.hidden_size,
                 cfg.depth, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps)
