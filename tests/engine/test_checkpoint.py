"""Checkpoints lose nothing: a run SIGKILLed in the middle of a checkpoint write and resumed with --resume auto logs
the same losses and ends with the same weights as a run that never stopped; the interrupted write leaves the previous
checkpoint intact; a corrupt checkpoint is detected by its checksum, reported with its path, and the previous good
one used; state files load with weights_only=True; old checkpoints are pruned to keep_last."""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ristretto.engine.checkpoint import (WRITE_DELAY_ENV, CheckpointError, latest_checkpoint, list_checkpoints,
                                         load_training_state, save_checkpoint, verify_checkpoint)
from ristretto.engine.cli import main as cli_main

REPO = Path(__file__).resolve().parents[2]
TINY = ["model.hidden_size=32", "model.num_heads=2", "model.depth=1", "data.frames=4", "data.resolution=16",
        "train.batch_size=2", "train.ckpt_every=2", "train.max_steps=8", "train.log_every=1", "train.warmup_steps=2",
        "train.keep_last=1", "train.cfg_dropout=0.3", "diffusion.sample_steps=1", "sample.num_samples=1"]
ARGS = [a for item in TINY for a in ("--set", item)]


def train_command(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), *ARGS, "--out", str(run_dir), *extra]


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "event" not in r]  # e.g. {"event": "resume"} marks where a resume began
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"metrics.jsonl steps out of order or repeated: {steps}"
    return {r["step"]: r["loss"] for r in records}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("full") / "run"
    result = subprocess.run(train_command(run_dir), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_sigkill_during_checkpoint_write_then_resume_matches_uninterrupted_run(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    # Each checkpoint write pauses between the weights and the manifest: kill inside that window, at step >= 5.
    env = dict(os.environ, **{WRITE_DELAY_ENV: "0.6"})
    process = subprocess.Popen(train_command(run_dir), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            metrics = run_dir / "metrics.jsonl"
            logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()] if metrics.exists() else []
            writing = list((run_dir / "checkpoints").glob(".tmp-step_*")) if logged else []
            if logged and logged[-1] >= 5 and writing:
                break
            time.sleep(0.05)
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    killed_at = max(json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    assert 5 <= killed_at < 8
    # The kill left a half-written temporary folder; the published checkpoints are whole and the newest is earlier.
    assert list((run_dir / "checkpoints").glob(".tmp-step_*"))
    newest = latest_checkpoint(run_dir)
    assert newest is not None and int(newest.name[5:]) < killed_at
    verify_checkpoint(newest)

    resumed = subprocess.run(train_command(run_dir, "--resume", "auto"), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {newest}" in resumed.stderr
    # Every step's loss equals the uninterrupted run's (lines after the checkpoint were cut and written again).
    assert losses(run_dir) == losses(uninterrupted)
    assert sorted(losses(run_dir)) == list(range(1, 9))
    for name in ("model.safetensors", "ema.safetensors"):
        ours, reference = load_file(str(run_dir / "weights" / name)), load_file(str(uninterrupted / "weights" / name))
        assert ours.keys() == reference.keys()
        for key in reference:
            assert torch.equal(ours[key], reference[key]), (name, key)
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))  # the next save cleaned the leftover


def test_checkpoint_contents_and_keep_last(uninterrupted):
    checkpoints = list_checkpoints(uninterrupted)
    assert [p.name for p in checkpoints] == ["step_00000006", "step_00000008"]  # keep_last=1: newest + 1 older
    final = checkpoints[-1]
    manifest = verify_checkpoint(final)
    assert manifest["step"] == 8
    assert set(manifest["files"]) == {"model.safetensors", "ema.safetensors", "state.pt"}
    state = load_training_state(final)  # torch.load(weights_only=True): no pickled objects
    assert state["step"] == 8 and state["train_state"]["samples_seen"] == 16
    assert state["loader"] == {"epoch": 0, "position": 16}
    assert state["scheduler"]["last_epoch"] == 8
    assert len(state["optimizer"]["state"]) > 0
    assert {"torch", "numpy", "python"} <= state["rng"].keys()
    assert json.loads(state["config"])["model"]["hidden_size"] == 32
    # The final weights equal the final checkpoint's.
    for name in ("model.safetensors", "ema.safetensors"):
        saved, weights = load_file(str(final / name)), load_file(str(uninterrupted / "weights" / name))
        assert all(torch.equal(saved[k], weights[k]) for k in weights)


def test_corrupt_checkpoint_is_reported_and_the_previous_one_used(tmp_path, uninterrupted, caplog, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    newest, previous = list_checkpoints(run_dir)[-1], list_checkpoints(run_dir)[-2]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    with pytest.raises(CheckpointError, match=str(newest)):
        verify_checkpoint(newest)
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(run_dir) == previous
    assert str(newest) in caplog.text and "checksum" in caplog.text
    # A flipped byte in the state file is caught too; a missing manifest (a torn write) as well.
    state = previous / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    assert latest_checkpoint(run_dir) is None
    # Asking to resume from the corrupt checkpoint explicitly: one line naming it, exit 2, nothing written.
    before = (run_dir / "metrics.jsonl").read_text()
    assert cli_main(["--resume", str(newest)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and str(newest) in error[0] and "checksum" in error[0]
    assert (run_dir / "metrics.jsonl").read_text() == before
    assert cli_main(["--resume", "auto", "--out", str(run_dir)]) == 2
    assert "no good checkpoint" in capsys.readouterr().err


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)


def test_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    model = Tiny()
    save_checkpoint(tmp_path, 2, model, None, {"step": 2}, keep_last=0)
    before = verify_checkpoint(tmp_path / "checkpoints" / "step_00000002")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)  # dies after the weights, before state.pt and the manifest
    with torch.no_grad():
        model.linear.weight.add_(1.0)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 4, model, None, {"step": 4}, keep_last=0)
    monkeypatch.undo()
    assert list((tmp_path / "checkpoints").glob(".tmp-step_00000004-*"))  # the partial write, never published
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_00000002"
    assert verify_checkpoint(tmp_path / "checkpoints" / "step_00000002") == before
    # A partial folder left by another (killed) process is ignored, then cleaned by the next successful save.
    (tmp_path / "checkpoints" / ".tmp-step_00000006-999999").mkdir()
    (tmp_path / "checkpoints" / "step_00000007").mkdir()  # published name but no manifest: reported, skipped
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_00000002"
    save_checkpoint(tmp_path, 8, model, None, {"step": 8}, keep_last=0)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000008"]
    assert torch.equal(load_file(str(tmp_path / "checkpoints/step_00000008/model.safetensors"))["linear.weight"],
                       model.linear.weight.detach())
