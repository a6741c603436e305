"""The two token layouts of Latte and the moves between them, in one place.

spatial:  [B * (F + I), S, D]  - each frame's S = (H/p)*(W/p) tokens attend to each other (I image frames last)
temporal: [B * S, F, D]        - each patch position's F video frames attend to each other; images are left out
"""
import torch


def to_temporal(spatial: torch.Tensor, batch: int, video_frames: int) -> torch.Tensor:
    """[B*(F+I), S, D] -> [B*S, F, D] over the video frames only."""
    tokens, dim = spatial.shape[1:]
    frames = spatial.view(batch, -1, tokens, dim)[:, :video_frames]  # (B, F, S, D)
    return frames.transpose(1, 2).reshape(batch * tokens, video_frames, dim)


def to_spatial(temporal: torch.Tensor, spatial_before: torch.Tensor, batch: int, video_frames: int) -> torch.Tensor:
    """[B*S, F, D] -> [B*(F+I), S, D]; image frames (after the video frames) come back unchanged from spatial_before."""
    tokens, dim = spatial_before.shape[1:]
    video = temporal.view(batch, tokens, video_frames, dim).transpose(1, 2)  # (B, F, S, D)
    total_frames = spatial_before.shape[0] // batch
    if total_frames > video_frames:  # joint image+video batch: images skip temporal attention
        images = spatial_before.view(batch, total_frames, tokens, dim)[:, video_frames:]
        video = torch.cat([video, images], dim=1)
    return video.reshape(batch * total_frames, tokens, dim)


def unpatchify(tokens: torch.Tensor, batch: int, patch: int, height: int, width: int) -> torch.Tensor:
    """[B*F, (H/p)*(W/p), p*p*C] -> video [B, F, C, H, W] (token features in (p, p, C) order, as DiT/diffusers)."""
    grid_h, grid_w = height // patch, width // patch
    channels = tokens.shape[-1] // (patch * patch)
    x = tokens.reshape(-1, grid_h, grid_w, patch, patch, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(batch, -1, channels, height, width)


def expand_rows(per_group: torch.Tensor, rows: int) -> torch.Tensor:
    """[M, ...] -> [rows, ...], each group repeated rows // M times (a caption per sample -> per frame)."""
    if per_group.shape[0] == rows:
        return per_group
    return per_group.repeat_interleave(rows // per_group.shape[0], dim=0)
