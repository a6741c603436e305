"""Run metrics: metrics.jsonl always (one JSON object per logged step); TensorBoard and wandb when enabled.

Optional loggers must never stop or stall training: wandb runs offline without an API key, and a failure inside
TensorBoard or wandb after start-up is logged once and that logger switched off.
"""
import json
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class MetricsLog:
    """enabled=False (ranks other than 0 under torchrun) makes every call a no-op: one process writes the logs."""

    def __init__(self, run_dir: Path, log_config=None, run_config: dict | None = None, enabled: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.tensorboard = self.wandb = None
        if not enabled:
            return
        if log_config is not None and log_config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - optional ([log] extra)

            self.tensorboard = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if log_config is not None and log_config.wandb:
            self.wandb = start_wandb(Path(run_dir), log_config.wandb_project, run_config)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())  # a kill right after a step must not lose its line
        step = record["step"]
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.tensorboard is not None:
            self._guard("tensorboard", lambda: [self.tensorboard.add_scalar(k, v, step) for k, v in scalars.items()])
        if self.wandb is not None:
            self._guard("wandb", lambda: self.wandb.log(scalars, step=step))

    def videos(self, step: int, videos, captions: list[str], fps: int) -> None:
        """Sample videos [B, F, 3, H, W] in [-1, 1] to TensorBoard (as videos when moviepy is installed, and always
        as one frame grid image: a row per video) and wandb."""
        frames = ((videos.float().clamp(-1, 1) + 1) * 127.5).to(torch.uint8).cpu()
        if self.tensorboard is not None:
            self._guard("tensorboard", lambda: self._tensorboard_videos(step, frames, fps))
        if self.wandb is not None:
            self._guard("wandb", lambda: self._wandb_videos(step, frames, captions, fps))

    def _tensorboard_videos(self, step: int, frames: torch.Tensor, fps: int) -> None:
        self.tensorboard.add_image("samples/frames", frame_grid(frames), step)
        try:
            import moviepy  # noqa: F401, PLC0415 - TensorBoard's video encoder
        except ImportError:
            return
        self.tensorboard.add_video("samples/videos", frames, step, fps=fps)

    def _wandb_videos(self, step: int, frames: torch.Tensor, captions: list[str], fps: int) -> None:
        import wandb  # noqa: PLC0415

        self.wandb.log({"samples": [wandb.Video(v.numpy(), fps=fps, caption=c) for v, c in zip(frames, captions)]},
                       step=step)

    def _guard(self, name: str, action) -> None:
        """Run a logger call; on failure warn once and switch that logger off (training goes on)."""
        try:
            action()
        except Exception as error:  # noqa: BLE001 - any logger failure must not stop training
            log.warning("%s logging failed (%s: %s); switching it off for this run", name, type(error).__name__, error)
            setattr(self, name, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self.tensorboard is not None:
            self._guard("tensorboard", self.tensorboard.close)
        if self.wandb is not None:
            self._guard("wandb", self.wandb.finish)
        self.tensorboard = self.wandb = None  # closing twice is harmless


def frame_grid(frames: torch.Tensor) -> torch.Tensor:
    """uint8 videos [B, F, 3, H, W] -> one image [3, B*H, F*W]: a row per video, frames left to right."""
    batch, count, channels, height, width = frames.shape
    return frames.permute(2, 0, 3, 1, 4).reshape(channels, batch * height, count * width)


def truncate_metrics(path: Path, last_step: int) -> int:
    """Drop metrics.jsonl lines logged after `last_step` (a resumed run logs them again); returns how many went.
    The file is rewritten under a temporary name and renamed, so a kill here leaves the old file whole."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            dropped += 1  # a torn last line from a kill mid-write
            continue
        if step <= last_step:
            kept.append(line)
        else:
            dropped += 1
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)
    return dropped


def start_wandb(run_dir: Path, project: str, run_config: dict | None):
    """wandb in offline mode unless an API key is configured: logging must never block or fail the run.
    A missing package is the user's error (they asked for wandb); a failing init only disables wandb."""
    try:
        import wandb  # noqa: PLC0415
    except ImportError:
        raise ValueError("log.wandb=true needs wandb: pip install wandb (or pip install -e '.[log]')") from None
    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    if mode == "offline":
        log.warning("wandb: no WANDB_API_KEY; logging offline to %s (sync later with `wandb sync`)", run_dir)
    try:
        return wandb.init(project=project, dir=str(run_dir), config=run_config, mode=mode)
    except Exception as error:  # noqa: BLE001 - a logger never stops training
        log.warning("wandb: init failed (%s: %s); training goes on without wandb", type(error).__name__, error)
        return None
