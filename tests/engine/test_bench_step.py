"""Smoke tests of the step and memory benchmarks: CPU runs that write the table, JSON and chart into tmp_path."""
import json

import pytest
import torch

from ristretto.bench import memory as memory_bench
from ristretto.bench import step as step_bench

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU smoke runs; GPUs run the full benchmarks")


def test_step_smoke_compares_ours_with_diffusers(tmp_path, capsys):
    payload = step_bench.main(["--out", str(tmp_path), "--checkpointing", "none,full", "--steps", "1"])
    written = json.loads((tmp_path / "step_cpu.json").read_text())
    assert written["rows"] == payload["rows"] and written["config"]["smoke"]
    rows = {(row["impl"], row["checkpointing"]): row for row in payload["rows"]}
    assert set(rows) == {("ours", "none"), ("diffusers", "none"), ("ours", "full"), ("diffusers", "full")}
    for row in rows.values():
        assert "note" not in row, row
        assert row["samples/s"] > 0 and row["tokens/s"] == pytest.approx(row["samples/s"] * 4 * 16)  # 4 x (16/4)^2
        assert row["TFLOP/s"] > 0
    assert rows[("ours", "none")]["speedup vs diffusers"] > 0
    assert "samples/s" in capsys.readouterr().out
    pytest.importorskip("matplotlib")
    assert (tmp_path / "step_cpu.png").stat().st_size > 0


def test_step_options_reach_our_model():
    args = step_bench.parse_args(["--kernels", "triton", "--attention", "sdpa-math", "--batch", "3", "--compile"])
    config = step_bench.bench_config(step_bench.CONFIGS["xl2"], args, "bf16", "full")
    assert (config.model.kernels, config.model.attention_backend, config.train.batch_size) == ("triton", "sdpa-math", 3)
    assert config.train.compile and config.train.checkpointing == "full" and config.data.kind == "cached"
    with pytest.raises(SystemExit):
        step_bench.parse_args(["--configs", "nope"])


def test_memory_smoke_matches_planner(tmp_path, capsys):
    payload = memory_bench.main(["--out", str(tmp_path), "--modes", "none,full,selective-mlp", "--no-layers"])
    written = json.loads((tmp_path / "memory_cpu.json").read_text())
    assert written["rows"] == payload["rows"]
    assert len(payload["rows"]) == 3 * len(memory_bench.SMOKE_CONFIGS)
    for row in payload["rows"]:
        assert 0.9 < row["planned/measured"] < 1.1, row
    fits = {(row["config"], row["checkpointing"]): row["planned largest batch (80 GiB)"]
            for row in payload["planner_fit"]}
    assert fits[("latte-xl2 16x256 class", "full")] > fits[("latte-xl2 16x256 class", "none")] >= 1
    assert "planned/measured" in capsys.readouterr().out
    pytest.importorskip("matplotlib")
    assert (tmp_path / "memory_cpu.png").stat().st_size > 0


def test_training_steps_run_a_real_optimizer_step_on_cpu():
    """The GPU measurement's step (micro_step_loss, backward, clip, AdamW, EMA) runs; only its CUDA counters wait."""
    config = memory_bench.case_config(memory_bench.SMOKE_CONFIGS[0], "full", "fp32", "sdpa")
    steps = memory_bench.TrainingSteps(config, torch.device("cpu"))
    before = [p.detach().clone() for p in steps.model.parameters()]
    steps.run(batch=2, steps=1)
    assert steps.state.step == 1
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, steps.model.parameters()))


@pytest.mark.parametrize("start", [1, 5, 9, 20])
def test_measured_largest_batch_walks_to_the_boundary(monkeypatch, start):
    monkeypatch.setattr(memory_bench, "runs", lambda steps, batch: batch <= 7)  # pretend batch 8 runs out of memory
    assert memory_bench.measured_largest_batch(None, start) == (7 if start - 7 <= memory_bench.MAX_PROBES else None)
    monkeypatch.setattr(memory_bench, "runs", lambda steps, batch: False)
    assert memory_bench.measured_largest_batch(None, 3) is None
