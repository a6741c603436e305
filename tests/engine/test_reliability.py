"""Runs that cannot be corrupted (docs/reliability.md): one writer per run folder (real processes), honest resume
overrides, one `error:` line for every bad input, validation before anything is written, signals in every phase,
manifests in every encoding, checkpoints that verify every file they hold."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ristretto.engine import train as train_module
from ristretto.engine.checkpoint import (latest_checkpoint, list_checkpoints, load_training_state, prune_checkpoints,
                                         save_checkpoint, verify_checkpoint, CheckpointError)
from ristretto.engine.cli import main as cli_main
from ristretto.engine.config import ConfigError, build_config
from ristretto.engine.run_lock import LOCK_FILE, RunLock, RunLocked

REPO = Path(__file__).resolve().parents[2]
TINY = ["model.hidden_size=32", "model.num_heads=2", "model.depth=1", "data.frames=2", "data.resolution=8",
        "train.batch_size=2", "train.log_every=1", "train.warmup_steps=1", "diffusion.sample_steps=1",
        "sample.num_samples=1"]


def sets(items) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def train_process(run_dir: Path, *extra: str, items=TINY, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *sets(items), "--out", str(run_dir), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for_steps(run_dir: Path, process: subprocess.Popen, steps: int, timeout: float = 240) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if sum("loss" in line for line in lines) >= steps:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {steps} steps logged: {process.poll()}")


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def one_error(capsys) -> str:
    captured = capsys.readouterr()
    lines = error_lines(captured.err)
    assert len(lines) == 1, captured.err[-3000:]
    return lines[0]


# ----------------------------------------------------------------------------------------- one writer per run

def test_a_second_trainer_or_resume_on_a_busy_folder_stops_at_once_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    first = train_process(run_dir, items=TINY + ["train.max_steps=100000"])
    try:
        wait_for_steps(run_dir, first, 2)
        for extra in ((), ("--resume", "auto")):
            started = time.monotonic()
            second = subprocess.run([sys.executable, str(REPO / "train.py"), *sets(TINY), "--out", str(run_dir),
                                     *extra], capture_output=True, text=True, timeout=120)
            assert second.returncode == 2, second.stderr[-3000:]
            (line,) = error_lines(second.stderr)
            assert f"PID {first.pid}" in line and str(run_dir) in line, line
            assert time.monotonic() - started < 60
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=120)
    finally:
        first.kill()
        first.wait()
    assert first.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # one writer: no step twice
    # The lock died with its holder: a resume now takes the folder (and is refused only for the resume's own reason).
    assert RunLock(run_dir).acquire().held


def test_the_lock_is_released_when_its_holder_is_killed(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from ristretto.engine.run_lock import RunLock; "
                               f"RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLocked, match=f"PID {holder.pid}"):
            RunLock(tmp_path).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        holder.kill()
    with RunLock(tmp_path) as lock:  # no stale lock after kill -9
        assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())
        with pytest.raises(RunLocked, match=f"PID {os.getpid()}"):  # a second open in one process is refused too
            RunLock(tmp_path).acquire()
    assert not lock.held


def test_export_into_a_busy_run_is_refused(tmp_path, capsys):
    from ristretto.engine.export import main as export_main

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"preset": "tiny-t2v"}))
    with RunLock(run_dir):
        assert export_main(["--run", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert f"PID {os.getpid()}" in err and not (run_dir / "export").exists()


def test_pruning_touches_only_finished_checkpoints_and_keep_last_is_checked(tmp_path):
    model = torch.nn.Linear(2, 2)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, None, {"step": step}, keep_last=5)
    root = tmp_path / "checkpoints"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live, dead = root / f".tmp-step_00000004-{sleeper.pid}", root / ".tmp-step_00000004-999999999"
        live.mkdir(), dead.mkdir()
        prune_checkpoints(root, -2)  # a negative count from library code still keeps the newest
        assert live.exists() and not dead.exists()
        assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003"]
    finally:
        sleeper.kill()
        sleeper.wait()
    for bad in ("-2", "0"):
        with pytest.raises(ConfigError, match="train.keep_last"):
            build_config("tiny-t2v", [f"train.keep_last={bad}"])
