"""Logging: metrics.jsonl always (loss, lr, grad norm, samples/s, tokens/s, peak memory); TensorBoard event files with
those scalars and the sample frames; wandb offline without an API key, given the same scalars and sample videos, and
never able to stop training; the tqdm bar shows step, loss and samples/s; a torn metrics line is dropped on resume."""
import json
import sys
import types

import pytest

from ristretto.engine.cli import main as cli_main
from ristretto.engine.config import build_config
from ristretto.engine.metrics import MetricsLog, truncate_metrics
from ristretto.engine.train import train

TINY = ["model.hidden_size=32", "model.num_heads=2", "model.depth=1", "data.frames=2", "data.resolution=8",
        "train.batch_size=2", "train.max_steps=2", "train.log_every=1", "train.warmup_steps=1",
        "diffusion.sample_steps=1", "sample.num_samples=2"]
SCALARS = {"loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "peak_rss_gb", "bad_steps"}


def test_metrics_jsonl_tensorboard_and_progress_bar(tmp_path, capsys, monkeypatch):
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("RISTRETTO_PROGRESS", "1")  # pytest's stderr is no terminal: the bar is off unless forced
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    train(build_config("tiny-t2v", TINY + ["log.tensorboard=true"]), run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(SCALARS <= r.keys() and r["samples_per_s"] > 0 and r["tokens_per_s"] > r["samples_per_s"]
               for r in records)
    # tokens/s = samples/s * tokens per sample: 2 frames x (8/4)^2 patches (tiny-t2v has patch 4).
    assert records[0]["tokens_per_s"] == pytest.approx(records[0]["samples_per_s"] * 2 * 4)

    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    accumulator = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    assert SCALARS <= set(accumulator.Tags()["scalars"])
    assert [e.step for e in accumulator.Scalars("loss")] == [1, 2]
    assert [e.value for e in accumulator.Scalars("loss")] == pytest.approx([r["loss"] for r in records], rel=1e-6)
    assert "samples/frames" in accumulator.Tags()["images"]
    image = accumulator.Images("samples/frames")[0]
    assert image.step == 2 and (image.width, image.height) == (2 * 8, 2 * 8)  # 2 frames wide, 2 videos high

    bar = capsys.readouterr().err
    assert "step=2" in bar and "loss=" in bar and "samples_s=" in bar


class FakeWandb(types.ModuleType):
    """Stands in for the wandb package: records what the run hands it."""

    def __init__(self, fail_init=False):
        super().__init__("wandb")
        self.fail_init, self.inits, self.logged, self.finished = fail_init, [], [], 0

    def init(self, **kwargs):
        if self.fail_init:
            raise RuntimeError("wandb service did not start")
        self.inits.append(kwargs)
        return self

    def log(self, data, step):
        self.logged.append((step, data))

    def finish(self):
        self.finished += 1

    class Video:
        def __init__(self, data, fps, caption):
            self.shape, self.fps, self.caption = data.shape, fps, caption


def test_wandb_runs_offline_without_api_key_and_gets_scalars_and_videos(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    train(build_config("tiny-t2v", TINY + ["log.wandb=true", "train.max_steps=1"]), tmp_path / "run")
    assert len(fake.inits) == 1 and fake.inits[0]["mode"] == "offline"
    assert fake.inits[0]["dir"] == str(tmp_path / "run") and fake.inits[0]["config"]["train"]["max_steps"] == 1
    step, scalars = fake.logged[0]
    assert step == 1 and SCALARS <= scalars.keys()
    step, media = fake.logged[-1]
    videos = media["samples"]
    assert step == 1 and len(videos) == 2 and videos[0].shape == (2, 3, 8, 8) and videos[0].caption
    assert fake.finished == 1


def test_a_failing_logger_never_stops_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", FakeWandb(fail_init=True))
    state = train(build_config("tiny-t2v", TINY + ["log.wandb=true", "train.max_steps=1"]), tmp_path / "run")
    assert state.step == 1

    class BrokenWriter:
        def add_scalar(self, *args):
            raise OSError("disk quota exceeded")

    metrics = MetricsLog(tmp_path / "run")
    metrics.tensorboard = BrokenWriter()
    metrics.write({"step": 5, "loss": 0.5})
    assert metrics.tensorboard is None  # switched off, metrics.jsonl still written
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1]) == {"step": 5, "loss": 0.5}


def test_missing_wandb_package_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "wandb" else object())
    assert cli_main(["--set", "log.wandb=true", "--out", str(tmp_path / "run")]) == 2
    assert "pip install wandb" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_truncate_metrics_drops_later_steps_and_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1}\n{"step": 2, "loss": 2}\n{"step": 3, "event": "bad_step"}\n'
                    '{"step": 3, "loss": 3}\n{"step": 4, "lo')
    assert truncate_metrics(path, 2) == 3
    assert path.read_text() == '{"step": 1, "loss": 1}\n{"step": 2, "loss": 2}\n'
