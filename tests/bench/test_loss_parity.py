"""bench.loss_parity: paired window losses over seeds, from run directories written like train.py writes them."""
import json

import pytest

from ristretto.bench import loss_parity


def write_run(path, seed, losses, quality=None, extra_lines=()):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"train": {"seed": seed}}))
    lines = [json.dumps({"step": step, "loss": loss, "lr": 1e-3}) for step, loss in losses.items()]
    (path / "metrics.jsonl").write_text("\n".join([*lines, *extra_lines]) + "\n")
    if quality is not None:
        (path / "quality.json").write_text(json.dumps({**quality, "n": 48}))
    return path


def constant(value, last=300):
    return {step: value for step in range(10, last + 1, 10)}


def test_window_ratios_and_phase_means_are_exact(tmp_path):
    base = write_run(tmp_path / "b0", 0, constant(1.0))
    cand = write_run(tmp_path / "c0", 0, {step: (1.1 if step <= 150 else 1.0) for step in range(10, 301, 10)})
    result = loss_parity.compare(loss_parity.pair_by_seed([base], [cand]), [100, 200, 300], [(100, 200), (250, 300)],
                                 100)
    seed = result["seeds"][0]
    assert seed["at"][100]["ratio"] == pytest.approx(0.1)
    assert seed["at"][200]["ratio"] == pytest.approx(0.05)  # steps 110..200: five at 1.1, five at 1.0
    assert seed["at"][300]["ratio"] == pytest.approx(0.0)
    assert seed["phases"]["100-200"]["ratios"] == pytest.approx([0.1, 0.05])
    assert seed["phases"]["250-300"]["ratios"] == pytest.approx([0.0])  # only the window ending at 300 lies inside
    assert result["phase_mean_over_seeds"]["100-200"] == pytest.approx(0.075)


def test_seeds_pair_by_config_not_by_order_and_mean_over_seeds(tmp_path):
    base = [write_run(tmp_path / f"b{s}", s, constant(1.0)) for s in (0, 1)]
    cand = [write_run(tmp_path / "c1", 1, constant(1.2)), write_run(tmp_path / "c0", 0, constant(1.0))]
    result = loss_parity.compare(loss_parity.pair_by_seed(base, cand), [300], [(100, 300)], 100)
    assert [row["seed"] for row in result["seeds"]] == [0, 1]
    assert [row["at"][300]["ratio"] for row in result["seeds"]] == pytest.approx([0.0, 0.2])
    assert result["at_mean_over_seeds"][300] == pytest.approx(0.1)


def test_a_resumed_run_keeps_the_last_loss_of_a_repeated_step(tmp_path):
    run = write_run(tmp_path / "r", 0, constant(1.0, 100),
                    extra_lines=[json.dumps({"step": 100, "event": "resume"}), json.dumps({"step": 100, "loss": 3.0})])
    losses = loss_parity.run_losses(run)
    assert losses[100] == 3.0 and len(losses) == 10


def test_errors_name_the_run(tmp_path):
    base = write_run(tmp_path / "b0", 0, constant(1.0))
    lonely = write_run(tmp_path / "c5", 5, constant(1.0))
    with pytest.raises(loss_parity.RunError, match="c5"):
        loss_parity.pair_by_seed([base], [lonely])
    twin = write_run(tmp_path / "b0_again", 0, constant(1.0))
    with pytest.raises(loss_parity.RunError, match="b0_again.*train.seed=0"):
        loss_parity.pair_by_seed([base, twin], [lonely])
    (tmp_path / "empty").mkdir()
    with pytest.raises(loss_parity.RunError, match="empty: no metrics.jsonl"):
        loss_parity.run_losses(tmp_path / "empty")
    (tmp_path / "b0" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\nnot json\n')
    with pytest.raises(loss_parity.RunError, match="metrics.jsonl:2: not JSON"):
        loss_parity.run_losses(base)


def test_main_prints_both_tables_and_writes_json(tmp_path, capsys):
    quality = {"colour_accuracy": 1.0, "direction_accuracy": 0.75, "shape_accuracy": 0.5}
    base = write_run(tmp_path / "b0", 0, constant(1.0), quality)
    cand = write_run(tmp_path / "c0", 0, constant(1.02), quality)
    result = loss_parity.main(["--baseline", str(base), "--candidate", str(cand), "--at", "100,300",
                               "--phases", "100-300", "--label", "fp8", "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert "1.0000 -> 1.0200 (+2.0%)" in printed and "+2.0% (+2.0..+2.0)" in printed
    assert "75.0%" in printed and "held-out quality" in printed
    written = json.loads(next((tmp_path / "out").glob("loss_parity_fp8_*.json")).read_text())
    assert written["seeds"][0]["quality"]["candidate"]["direction_accuracy"] == 0.75
    assert result["phase_mean_over_seeds"]["100-300"] == pytest.approx(0.02)
    with pytest.raises(SystemExit, match="--phases"):
        loss_parity.main(["--baseline", str(base), "--candidate", str(cand), "--phases", "100:300"])
