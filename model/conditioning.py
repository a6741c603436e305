"""Conditioning of the two Latte variants: what the blocks are modulated by and what they cross-attend to.

TextConditioning (Latte-1, text-to-video): timestep -> adaLN-single vectors; T5-style caption -> projected context
(one caption per video, or one per frame when image frames carry their own captions).
ClassConditioning (Latte-XL, class-conditional): timestep + class label -> one vector for adaLN-Zero; no context.
"""
from typing import NamedTuple

import torch
from torch import nn

from .embeddings import CaptionProjection, LabelEmbedder, TimestepEmbedder
from .modulation import AdaLNSingleCaption, AdaLNSingleTable, AdaLNZero


class Conditions(NamedTuple):
    block: torch.Tensor  # (B, .) input of every block's modulation
    final: torch.Tensor  # (B, .) input of the final layer's modulation
    context: torch.Tensor | None  # (B, L, D) or (B*(F+I), L, D) caption tokens for cross-attention
    context_mask: torch.Tensor | None  # bool, same rows as context


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[B, L, D] -> [B, D] mean over unmasked tokens."""
    if mask is None:
        return tokens.mean(dim=1)
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class TextConditioning(nn.Module):
    has_context = True

    def __init__(self, hidden_size: int, caption_channels: int, pooled_caption: bool = False,
                 caption_adaln: bool = False):
        super().__init__()
        self.caption_adaln = caption_adaln  # blocks also modulated per block by the pooled caption
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.caption_projection = CaptionProjection(caption_channels, hidden_size)
        # Optional: a pooled caption vector joins the timestep embedding, so every block's modulation sees the caption.
        self.caption_pool = nn.Linear(hidden_size, hidden_size) if pooled_caption else None

    def modulation(self, num_vectors: int, hidden_size: int) -> nn.Module:
        return (AdaLNSingleCaption if self.caption_adaln else AdaLNSingleTable)(num_vectors, hidden_size)

    def forward(self, timestep, caption, caption_mask=None, image_caption=None, image_caption_mask=None,
                video_frames: int = 1) -> Conditions:
        t_emb = self.t_embedder(timestep)  # (B, D)
        context = self.caption_projection(caption)  # (B, L, D)
        pooled = masked_mean(context, caption_mask) if self.caption_pool is not None or self.caption_adaln else None
        if self.caption_pool is not None:
            t_emb = t_emb + self.caption_pool(pooled)
        block, final = self.t_block(t_emb), t_emb  # (B, 6D), (B, D)
        if self.caption_adaln:  # AdaLNSingleCaption reads the pooled caption after the timestep vectors
            block, final = torch.cat([block, pooled], dim=1), torch.cat([final, pooled], dim=1)
        if image_caption is not None:  # joint training: one caption per frame, video caption first
            context, caption_mask = per_frame_captions(context, caption_mask, self.caption_projection(image_caption),
                                                       image_caption_mask, video_frames)
        return Conditions(block, final, context, caption_mask)


def per_frame_captions(video_context, video_mask, image_context, image_mask, video_frames: int):
    """Video caption [B, L, D] repeated over F frames + image captions [B, I, L, D] -> [B*(F+I), L, D] (+ mask)."""
    batch, length, dim = video_context.shape
    frames = video_context[:, None].expand(batch, video_frames, length, dim)
    context = torch.cat([frames, image_context], dim=1).reshape(-1, length, dim)
    if video_mask is None and image_mask is None:
        return context, None
    video_mask = video_mask if video_mask is not None else torch.ones(batch, length, dtype=torch.bool,
                                                                      device=context.device)
    image_mask = image_mask if image_mask is not None else torch.ones(image_context.shape[:3], dtype=torch.bool,
                                                                      device=context.device)
    mask = torch.cat([video_mask[:, None].expand(batch, video_frames, length), image_mask], dim=1)
    return context, mask.reshape(-1, length)


class ClassConditioning(nn.Module):
    has_context = False

    def __init__(self, hidden_size: int, num_classes: int):
        super().__init__()
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)

    @staticmethod
    def modulation(num_vectors: int, hidden_size: int) -> nn.Module:
        return AdaLNZero(num_vectors, hidden_size)

    def forward(self, timestep, label, video_frames: int = 1) -> Conditions:
        cond = self.t_embedder(timestep) + self.y_embedder(label)  # (B, D)
        return Conditions(cond, cond, None, None)
