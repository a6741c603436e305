"""train.py's CLI: every user mistake (unknown preset or key, unusable or taken output folder, a resume from a missing
folder, a corrupt checkpoint or a run of another model shape) is one line on stderr, exit 2, nothing written or
overwritten; --resume picks the right run, checkpoint and config."""
import json
from pathlib import Path

import pytest
import torch

from ristretto.engine.checkpoint import save_checkpoint
from ristretto.engine.cli import main, parse_args, prepare
from ristretto.engine.config import build_config, config_to_dict

TINY = ["model.hidden_size=32", "model.num_heads=2", "model.depth=1", "data.frames=2", "data.resolution=8"]
ARGS = [a for item in TINY for a in ("--set", item)]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def saved_run(tmp_path) -> Path:
    """A run folder as train.py leaves it: config.json, metrics.jsonl and one checkpoint (stand-in weights)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(config_to_dict(build_config("tiny-t2v", TINY))))
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n')
    save_checkpoint(run_dir, 2, torch.nn.Linear(2, 2), None, {"step": 2})
    return run_dir


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert captured.out == ""
    return lines[0]


def test_unknown_preset(tmp_path, capsys):
    assert main(["--preset", "latte-huge", "--out", str(tmp_path / "run")]) == 2
    assert "latte-huge" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_unknown_key_and_bad_value(tmp_path, capsys):
    assert main(["--set", "train.learning_rate=1", "--out", str(tmp_path / "run")]) == 2
    assert "train.learning_rate" in one_error_line(capsys)
    assert main(["--set", "train.max_steps=many", "--out", str(tmp_path / "run")]) == 2
    assert "train.max_steps" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main([*ARGS, "--out", str(blocker / "run")]) == 2
    line = one_error_line(capsys)
    assert "cannot write" in line and str(blocker / "run") in line
    assert blocker.read_text() == "not a folder"


def test_existing_run_is_not_overwritten(saved_run, capsys):
    before = snapshot(saved_run)
    assert main([*ARGS, "--out", str(saved_run)]) == 2
    assert "already holds a run" in one_error_line(capsys)
    assert snapshot(saved_run) == before


def test_resume_from_another_model_shape_is_refused(saved_run, capsys):
    before = snapshot(saved_run)
    assert main([*ARGS, "--set", "model.hidden_size=64", "--resume", "auto", "--out", str(saved_run)]) == 2
    line = one_error_line(capsys)
    assert "model.hidden_size=64" in line and "32" in line and str(saved_run / "config.json") in line
    assert main([*ARGS, "--set", "data.frames=4", "--resume", str(saved_run)]) == 2
    assert "data.frames" in one_error_line(capsys)
    assert snapshot(saved_run) == before


def test_resume_from_missing_or_empty_places(tmp_path, saved_run, capsys):
    assert main(["--resume", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in one_error_line(capsys)
    assert main(["--resume", "auto"]) == 2
    assert "--out" in one_error_line(capsys)
    empty_run = tmp_path / "empty"
    empty_run.mkdir()
    (empty_run / "config.json").write_text((saved_run / "config.json").read_text())
    # A run that stopped before its first checkpoint starts again from its saved config (not "no checkpoint").
    config, run_dir, found = prepare(parse_args(["--resume", "auto", "--out", str(empty_run)]))
    assert (run_dir, found) == (empty_run, None) and config_to_dict(config) == json.loads(
        (saved_run / "config.json").read_text())
    # One whose checkpoints are all damaged is refused: its history would be lost.
    corrupt = empty_run / "checkpoints" / "step_00000002"
    corrupt.mkdir(parents=True)
    (corrupt / "manifest.json").write_text("{")
    assert main(["--resume", "auto", "--out", str(empty_run)]) == 2
    assert "no good checkpoint" in one_error_line(capsys)
    assert main(["--preset", "nope", "--resume", "auto", "--out", str(saved_run)]) == 2
    assert "nope" in one_error_line(capsys)


def test_resume_picks_run_checkpoint_and_config(tmp_path, saved_run):
    checkpoint = saved_run / "checkpoints" / "step_00000002"
    # auto, no --set: the saved config as is.
    config, run_dir, found = prepare(parse_args(["--resume", "auto", "--out", str(saved_run)]))
    assert (run_dir, found) == (saved_run, checkpoint)
    assert config_to_dict(config) == json.loads((saved_run / "config.json").read_text())
    # Same shape, other training fields: allowed (e.g. train longer, another attention backend).
    config, _, _ = prepare(parse_args([*ARGS, "--set", "train.max_steps=99", "--set", "model.attention_backend=sdpa-math",
                                       "--resume", str(saved_run)]))
    assert config.train.max_steps == 99
    # A checkpoint folder: its run; with a new --out, a new run starting from it.
    assert prepare(parse_args(["--resume", str(checkpoint)]))[1:] == (saved_run, checkpoint)
    assert prepare(parse_args(["--resume", str(checkpoint), "--out", str(tmp_path / "fork")]))[1:] == \
        (tmp_path / "fork", checkpoint)
    # auto on a folder with no run yet: a fresh start (preemptible jobs can always pass --resume auto).
    assert prepare(parse_args([*ARGS, "--resume", "auto", "--out", str(tmp_path / "new")]))[1:] == \
        (tmp_path / "new", None)
