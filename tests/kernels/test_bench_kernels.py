"""Smoke test of `python -m ristretto.bench.kernels`: the CPU run times every op and writes well-formed JSON."""
import json

import pytest
import torch

from ristretto.bench import kernels as bench_kernels


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run is the real benchmark, not a smoke test")
def test_smoke_run_writes_results(tmp_path, capsys):
    path = bench_kernels.main(["--out", str(tmp_path)])

    assert path == tmp_path / "kernels_cpu.json"
    results = json.loads(path.read_text())
    assert results["config"]["smoke"] is True and results["environment"]["torch"] == torch.__version__
    assert results["copy_bandwidth_gbps"] > 0
    rows = results["rows"]
    expected = {(op, mode) for op in bench_kernels.OPS for mode in ("fwd", "fwd+bwd")}
    assert {(row["op"], row["mode"]) for row in rows} == expected
    for op, mode in expected:
        impls = {row["impl"]: row for row in rows if (row["op"], row["mode"]) == (op, mode)}
        assert {"triton", "torch"} <= set(impls) and ("conv2d" in impls) == (op == "patch_embed")
        assert impls["torch"]["speedup_vs_eager"] == 1.0
        assert all(row["ms"] > 0 and row["GB/s"] > 0 and row["frac_copy_bw"] > 0 for row in impls.values())
    assert "triton" in capsys.readouterr().out  # the table was printed


def test_cpu_run_without_out_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_kernels, "RESULTS_DIR", tmp_path)
    if torch.cuda.is_available():
        pytest.skip("on a GPU the default is bench/results")
    assert bench_kernels.main(["--ops", "gate_residual"]) is None
    assert not any(tmp_path.iterdir())


def test_unknown_op_is_named():
    with pytest.raises(SystemExit):
        bench_kernels.parse_args(["--ops", "layernorm_modulate,softmax"])
