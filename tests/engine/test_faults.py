"""Faults: a NaN/inf loss skips its optimizer step (weights, optimizer, EMA and schedule untouched), is counted and
logged, and max_bad_steps in a row stop the run with one clear line and no poisoned checkpoint; SIGINT/SIGTERM write
a checkpoint and exit cleanly; out-of-memory is re-raised with the batch, frames, resolution and what to change."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ristretto.engine import train as train_module
from ristretto.engine.distributed import init_distributed
from ristretto.engine.build import build_training_model
from ristretto.engine.checkpoint import latest_checkpoint, list_checkpoints, load_training_state, verify_checkpoint
from ristretto.engine.cli import main as cli_main
from ristretto.engine.config import build_config
from ristretto.engine.train import TrainingFault, TrainState, build_optimizer, update_step, train

REPO = Path(__file__).resolve().parents[2]
TINY = ["model.hidden_size=32", "model.num_heads=2", "model.depth=1", "data.frames=2", "data.resolution=8",
        "train.batch_size=2", "train.log_every=1", "train.warmup_steps=1", "diffusion.sample_steps=1",
        "sample.num_samples=1"]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def poison_attempts(monkeypatch, attempts: set[int], batch_size: int = 2, value=float("nan")):
    """Make the loss of optimizer-step attempts `attempts` (1-based, counting skipped ones) NaN."""
    real = train_module.micro_step_loss

    def poisoned(model, diffusion, precision, latents, conditions, first_index, config):
        loss = real(model, diffusion, precision, latents, conditions, first_index, config)
        return loss * value if first_index // batch_size + 1 in attempts else loss

    monkeypatch.setattr(train_module, "micro_step_loss", poisoned)


def test_non_finite_gradient_skips_the_whole_update_step():
    config = build_config("tiny-t2v", TINY)
    model, ema, _ = build_training_model(config, torch.device("cpu"))
    optimizer, scheduler = build_optimizer(model, config.train)
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    update_step(model, optimizer, scheduler, ema, TrainState(), config.train, loss=1.0)  # one good step
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ema_before = {k: v.clone() for k, v in ema.state_dict().items()}
    moments = {k: v["exp_avg"].clone() for k, v in optimizer.state_dict()["state"].items()}
    for param in model.parameters():
        param.grad = torch.full_like(param, float("inf"))
    stepped = update_step(model, optimizer, scheduler, ema, TrainState(step=1), config.train, loss=1.0).stepped
    assert not stepped
    for param in model.parameters():
        param.grad = torch.ones_like(param)  # finite gradients but a NaN loss: skipped as well
    stepped = update_step(model, optimizer, scheduler, ema, TrainState(step=1), config.train,
                          loss=float("nan")).stepped
    assert not stepped
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, ema_before[k]) for k, v in ema.state_dict().items())
    assert all(torch.equal(v["exp_avg"], moments[k]) for k, v in optimizer.state_dict()["state"].items())
    assert scheduler.last_epoch == 1
    assert all(p.grad is None for p in model.parameters())


def test_a_nan_step_is_skipped_counted_and_logged(tmp_path, monkeypatch):
    poison_attempts(monkeypatch, {2})
    state = train(build_config("tiny-t2v", TINY + ["train.max_steps=3"]), tmp_path / "run")
    assert state.step == 3 and state.bad_steps_total == 1 and state.bad_steps_in_row == 0
    assert state.samples_seen == 4 * 2  # the skipped step's samples are consumed, not replayed
    lines = records(tmp_path / "run")
    assert [(r["step"], r.get("event")) for r in lines] == [(1, None), (2, "bad_step"), (2, None), (3, None)]
    assert lines[1]["loss"] == "nan" and lines[-1]["bad_steps"] == 1


def test_max_bad_steps_in_a_row_stop_the_run_without_a_poisoned_checkpoint(tmp_path, monkeypatch, capsys):
    poison_attempts(monkeypatch, {3, 4, 5, 6}, value=float("inf"))
    run_dir = tmp_path / "run"
    args = [a for item in TINY + ["train.max_steps=10", "train.ckpt_every=1", "train.max_bad_steps=3"]
            for a in ("--set", item)]
    assert cli_main([*args, "--out", str(run_dir)]) == 1
    stderr = capsys.readouterr().err
    error = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in stderr
    assert len(error) == 1 and "3 optimizer steps in a row" in error[0] and "train.max_bad_steps=3" in error[0]
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000001", "step_00000002"]
    newest = latest_checkpoint(run_dir)
    assert load_training_state(newest)["step"] == 2
    assert [r.get("event") for r in records(run_dir)][-3:] == ["bad_step"] * 3


def test_a_checkpoint_of_non_finite_weights_is_refused(tmp_path):
    config = build_config("tiny-t2v", TINY)
    model, ema, _ = build_training_model(config, torch.device("cpu"))
    optimizer, scheduler = build_optimizer(model, config.train)
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    with pytest.raises(TrainingFault, match="NaN"):
        train_module.write_checkpoint(tmp_path, model, ema, optimizer, scheduler, None, TrainState(step=3), config,
                                      init_distributed("none", "cpu"))
    assert not list_checkpoints(tmp_path)


def test_out_of_memory_is_reraised_with_sizes_and_a_hint(tmp_path, monkeypatch, capsys):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_module, "micro_step_loss", out_of_memory)
    config = build_config("tiny-t2v", TINY + ["train.max_steps=2", "train.grad_accum=3"])
    with pytest.raises(torch.OutOfMemoryError) as caught:
        train(config, tmp_path / "run")
    message = str(caught.value)
    for part in ("train.batch_size=2", "data.frames=2", "data.resolution=8", "train.grad_accum=3",
                 "larger train.grad_accum", "train.checkpointing="):
        assert part in message, part
    assert isinstance(caught.value.__cause__, torch.OutOfMemoryError)  # the original error is kept
    args = [a for item in TINY + ["train.max_steps=2"] for a in ("--set", item)]
    assert cli_main([*args, "--out", str(tmp_path / "cli")]) == 1
    stderr = capsys.readouterr().err
    error = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in stderr
    assert len(error) == 1 and error[0].startswith("error: out of memory") and "train.batch_size=2" in error[0]


def test_sigint_in_process_checkpoints_and_returns(tmp_path, monkeypatch):
    real = train_module.micro_step_loss

    def interrupt_during_step_two(model, diffusion, precision, latents, conditions, first_index, config):
        if first_index == 2:  # inside the second optimizer step: it finishes, then the run stops
            os.kill(os.getpid(), signal.SIGINT)
        return real(model, diffusion, precision, latents, conditions, first_index, config)

    monkeypatch.setattr(train_module, "micro_step_loss", interrupt_during_step_two)
    state = train(build_config("tiny-t2v", TINY + ["train.max_steps=50"]), tmp_path / "run")
    assert state.stopped_by == "SIGINT" and state.step == 2
    assert load_training_state(latest_checkpoint(tmp_path / "run"))["step"] == 2
    assert not (tmp_path / "run" / "weights").exists()  # an interrupted run is not a finished one
    assert signal.getsignal(signal.SIGINT) is not None and signal.getsignal(signal.SIGINT) != signal.SIG_IGN


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path):
    run_dir = tmp_path / "run"
    args = [a for item in TINY + ["train.max_steps=100000"] for a in ("--set", item)]
    process = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args, "--out", str(run_dir)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            if (run_dir / "metrics.jsonl").exists() and len(records(run_dir)) >= 2:
                break
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr
    assert "stopped by SIGTERM" in stderr and f"--resume auto --out {run_dir}" in stderr
    checkpoint = latest_checkpoint(run_dir)
    verify_checkpoint(checkpoint)
    assert load_training_state(checkpoint)["step"] == max(r["step"] for r in records(run_dir)) >= 2
