"""The token layouts of Latte and the moves between them, in one place.

The residual stream always stays in the spatial layout; temporal blocks see its video rows (a view) and only
temporal attention regroups q, k, v by frames - inside the Triton kernel (no copy) or here (attention backends).

spatial:  [B * (F + I), S, D]  - each frame's S = (H/p)*(W/p) tokens (I image frames last); spatial blocks and
                                 cross-attention use all rows
video:    [B * F, S, D]        - the video frames' rows, what temporal blocks see: a view when I = 0
frame sequences: [B * S, F, heads, dim] - q, k, v of one patch position across the F frames, for attention
                                 backends that take sequences (a copy; the Triton temporal kernel reads the video rows)
"""
import torch


def video_rows(tokens: torch.Tensor, batch: int, video_frames: int) -> torch.Tensor:
    """[B*(F+I), S, D] -> [B*F, S, D]: a view without image frames, else a copy of the video frames."""
    if tokens.shape[0] == batch * video_frames:
        return tokens
    return tokens.unflatten(0, (batch, -1))[:, :video_frames].flatten(0, 1)


def with_image_rows(video: torch.Tensor, tokens: torch.Tensor, batch: int, video_frames: int) -> torch.Tensor:
    """[B*F, S, D] video rows + the image frames of tokens [B*(F+I), S, D] (unchanged) -> [B*(F+I), S, D]."""
    if tokens.shape[0] == video.shape[0]:
        return video
    images = tokens.unflatten(0, (batch, -1))[:, video_frames:]  # (B, I, S, D)
    return torch.cat([video.unflatten(0, (batch, video_frames)), images], dim=1).flatten(0, 1)


def add_frame_embedding(video: torch.Tensor, table: torch.Tensor, batch: int) -> torch.Tensor:
    """video [B*F, S, D] + table [F, D]: frame f's embedding added to every token of frame f."""
    return (video.unflatten(0, (batch, -1)) + table[:, None, :].to(video.dtype)).flatten(0, 1)


def frame_sequences(qkv: torch.Tensor, frames: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [B*F, S, 3, heads, dim] -> q, k, v, each [B*S, F, heads, dim]: views of one copy, so an attention that
    saves its inputs saves one storage, as it would for a spatial qkv."""
    rows, tokens, _, heads, dim = qkv.shape
    by_frame = qkv.view(rows // frames, frames, tokens, 3, heads, dim).permute(3, 0, 2, 1, 4, 5)  # (3, B, S, F, h, d)
    return by_frame.reshape(3, -1, frames, heads, dim).unbind(0)


def frames_from_sequences(out: torch.Tensor, tokens: int) -> torch.Tensor:
    """[B*S, F, ...] -> [B*F, S, ...] (a copy)."""
    by_position = out.unflatten(0, (-1, tokens))  # (B, S, F, ...)
    return by_position.transpose(1, 2).reshape(-1, tokens, *out.shape[2:])


def sequences_from_frames(rows: torch.Tensor, frames: int) -> torch.Tensor:
    """[B*F, S, ...] -> [B*S, F, ...] (a copy): the inverse of frames_from_sequences."""
    by_frame = rows.unflatten(0, (-1, frames))  # (B, F, S, ...)
    return by_frame.transpose(1, 2).reshape(-1, frames, *rows.shape[2:])


def unpatchify(tokens: torch.Tensor, batch: int, patch: int, height: int, width: int) -> torch.Tensor:
    """[B*F, (H/p)*(W/p), p*p*C] -> video [B, F, C, H, W] (token features in (p, p, C) order, as DiT/diffusers)."""
    grid_h, grid_w = height // patch, width // patch
    channels = tokens.shape[-1] // (patch * patch)
    x = tokens.reshape(-1, grid_h, grid_w, patch, patch, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(batch, -1, channels, height, width)
