"""Smoke tests of the step and memory benchmarks: CPU runs that write the table, JSON and chart into tmp_path."""
import json
import math

import pytest
import torch

from ristretto.bench import loader as loader_bench
from ristretto.bench import memory as memory_bench
from ristretto.bench import step as step_bench

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU smoke runs; GPUs run the full benchmarks")


def test_step_smoke_times_the_training_loops_step_for_ours_and_diffusers(tmp_path, capsys, monkeypatch):
    calls = []
    real_step = step_bench.train_module.train_step

    def counting_step(*args, **kwargs):
        calls.append(args[0])
        return real_step(*args, **kwargs)

    monkeypatch.setattr(step_bench.train_module, "train_step", counting_step)
    payload = step_bench.main(["--out", str(tmp_path), "--checkpointing", "none,full", "--steps", "1",
                               "--variants", "eager,diffusers,triton"])
    written = json.loads((tmp_path / "step_cpu.json").read_text())
    assert written["rows"] == payload["rows"] and written["config"]["smoke"]
    rows = {(row["variant"], row["checkpointing"]): row for row in payload["rows"]}
    assert set(rows) == {(v, m) for v in ("eager", "diffusers", "triton") for m in ("none", "full")}
    for mode in ("none", "full"):
        assert rows[("triton", mode)]["note"] == "needs CUDA"
        for variant in ("eager", "diffusers"):
            row = rows[(variant, mode)]
            assert "note" not in row, row
            assert row["samples/s"] > 0 and row["tokens/s"] == pytest.approx(row["samples/s"] * 4 * 16)  # 4 x (16/4)^2
            assert row["TFLOP/s"] > 0 and math.isfinite(row["loss"])
        assert rows[("diffusers", mode)]["speedup vs diffusers"] == 1.0
        assert rows[("eager", mode)]["speedup vs diffusers"] > 0
    # engine.train.train_step is what was timed: warm-up 1 + timed 1 + the loss read 1, per row that ran, for both
    # our model and diffusers' (behind its adapter)
    assert len(calls) == 3 * 4
    assert sum(isinstance(model, step_bench.DiffusersAsLatte) for model in calls) == 3 * 2
    assert "samples/s" in capsys.readouterr().out
    pytest.importorskip("matplotlib")
    assert (tmp_path / "step_cpu.png").stat().st_size > 0


def test_step_rig_runs_the_real_loss_clip_optimizer_and_ema():
    config = step_bench.bench_config(step_bench.SMOKE_CONFIG, step_bench.parse_args([]), "fp32", "none")
    assert config.model.learn_sigma and config.train.ema_decay > 0 and config.train.grad_clip > 0
    rig = step_bench.StepRig.build(config, torch.device("cpu"))
    ema_before = [p.clone() for p in rig.ema.model.parameters()]
    result = rig.step()
    assert result.stepped and rig.state.step == 1 and rig.state.samples_seen == 2
    assert rig.optimizer.defaults["foreach"]  # fused on CUDA
    assert any(not torch.equal(a, b) for a, b in zip(ema_before, rig.ema.model.parameters()))


def test_step_options_reach_our_model():
    args = step_bench.parse_args(["--attention", "sdpa-math", "--batch", "3"])
    config = step_bench.bench_config(step_bench.CONFIGS["xl2-t2v"], args, "bf16", "full",
                                     step_bench.VARIANTS["triton+compile"])
    assert (config.model.kernels, config.model.attention_backend, config.train.batch_size) == ("triton", "sdpa-math", 3)
    assert config.train.compile and config.train.checkpointing == "full" and config.data.kind == "cached"
    fp8 = step_bench.bench_config(step_bench.CONFIGS["t2v512"], args, "bf16", "none", step_bench.VARIANTS["fp8-ao+compile"])
    assert fp8.train.precision == "fp8-ao" and fp8.train.compile
    assert step_bench.parse_args([]).configs == ["xl2-t2v", "t2v512"]
    with pytest.raises(SystemExit):
        step_bench.parse_args(["--configs", "nope"])
    with pytest.raises(SystemExit):
        step_bench.parse_args(["--variants", "nope"])


@pytest.mark.parametrize("argv, expected", [
    ([], list(step_bench.VARIANTS)),
    (["--variants", "compile,diffusers"], ["compile", "diffusers"]),
    (["--kernels", "triton"], ["triton", "diffusers"]),
    (["--compile"], ["compile", "diffusers+compile"]),
    (["--compile", "--precision", "fp8-ao"], ["fp8-ao+compile", "diffusers+compile"]),
    (["--kernels", "triton", "--compile"], ["triton+compile", "diffusers+compile"]),
])
def test_variant_selection(argv, expected):
    chosen = step_bench.selected_variants(step_bench.parse_args(argv), smoke=False)
    assert list(chosen) == expected
    for name, variant in chosen.items():
        if name in step_bench.VARIANTS:
            assert variant == step_bench.VARIANTS[name]
    assert list(step_bench.selected_variants(step_bench.parse_args([]), smoke=True)) == ["eager", "diffusers"]


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


def test_loader_smoke_reports_clips_per_second_against_the_steps_consumption(tmp_path, capsys):
    step_json = tmp_path / "step_cpu.json"
    step_json.write_text(json.dumps({"rows": [{"samples/s": 1e-3}, {"samples/s": 2e-3}, {"note": "needs CUDA"}]}))
    payload = loader_bench.main(["--set", "data.synthetic_size=16", "--set", "train.batch_size=2", "--workers", "0,1",
                                 "--batches", "2", "--step-json", str(step_json), "--out", str(tmp_path)])
    assert [row["workers"] for row in payload["rows"]] == [0, 1]
    for row in payload["rows"]:
        assert row["clips/s"] > 0 and row["step consumes/s"] == 2e-3 and row["keeps up"]
    assert json.loads((tmp_path / "loader_cpu.json").read_text())["rows"] == payload["rows"]
    assert "clips/s" in capsys.readouterr().out
