"""Run metrics: metrics.jsonl always (one JSON object per logged step); TensorBoard and wandb when enabled."""
import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


class MetricsLog:
    def __init__(self, run_dir: Path, log_config=None, run_config: dict | None = None):
        self.path = run_dir / "metrics.jsonl"
        self.tensorboard = self.wandb = None
        if log_config is not None and log_config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - optional ([log] extra)

            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        if log_config is not None and log_config.wandb:
            self.wandb = start_wandb(run_dir, log_config.wandb_project, run_config)

    def write(self, record: dict) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())  # a kill right after a step must not lose its line
        step = record["step"]
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def videos(self, step: int, videos, captions: list[str], fps: int) -> None:
        """Sample videos [B, F, 3, H, W] in [-1, 1] to TensorBoard / wandb."""
        frames = ((videos.float().clamp(-1, 1) + 1) * 127.5).to(dtype=__import__("torch").uint8).cpu()
        if self.tensorboard is not None:
            self.tensorboard.add_video("samples", frames, step, fps=fps)
        if self.wandb is not None:
            import wandb  # noqa: PLC0415

            self.wandb.log({"samples": [wandb.Video(v.numpy(), fps=fps, caption=c) for v, c in zip(frames, captions)]},
                           step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def start_wandb(run_dir: Path, project: str, run_config: dict | None):
    """wandb in offline mode unless an API key is configured: logging must never block or fail the run."""
    try:
        import wandb  # noqa: PLC0415
    except ImportError:
        raise ValueError("log.wandb=true needs wandb: pip install wandb (or pip install -e '.[log]')") from None
    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    if mode == "offline":
        log.warning("wandb: no WANDB_API_KEY; logging offline to %s (sync later with `wandb sync`)", run_dir)
    return wandb.init(project=project, dir=str(run_dir), config=run_config, mode=mode)
