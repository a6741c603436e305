"""Writing what people look at: videos (.mp4 with PyAV, else .gif) and a contact sheet of frames with captions."""
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """[F, 3, H, W] in [-1, 1] -> [F, H, W, 3] uint8."""
    frames = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(0, 2, 3, 1).cpu().numpy()


def write_video(path: Path, video: torch.Tensor, fps: int = 8, upscale: int = 4) -> Path:
    """Write [F, 3, H, W] in [-1, 1] as .mp4 (H.264 via PyAV) when PyAV is installed, else as .gif; returns the path.
    Small frames are upscaled (nearest) so players show them at a visible size."""
    frames = to_uint8_frames(video).repeat(upscale, axis=1).repeat(upscale, axis=2)
    try:
        import av  # noqa: PLC0415 - optional ([video] extra)
    except ImportError:
        return write_gif(path.with_suffix(".gif"), frames, fps)
    path = path.with_suffix(".mp4")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "12"} if stream.codec_context.name == "libx264" else {}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def write_gif(path: Path, frames: np.ndarray, fps: int) -> Path:
    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path


def contact_sheet(path: Path, videos: list[torch.Tensor], captions: list[str], cell: int = 64) -> Path:
    """One row per video: its frames left to right at `cell` px, the caption as the row's title."""
    frames_per_row = max(v.shape[0] for v in videos)
    title_height = 16
    sheet = Image.new("RGB", (frames_per_row * cell, len(videos) * (cell + title_height)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (video, caption) in enumerate(zip(videos, captions)):
        top = row * (cell + title_height)
        draw.text((4, top + 2), caption, fill="black")
        for column, frame in enumerate(to_uint8_frames(video)):
            image = Image.fromarray(frame).resize((cell, cell), Image.NEAREST)
            sheet.paste(image, (column * cell, top + title_height))
    sheet.save(path)
    return path
