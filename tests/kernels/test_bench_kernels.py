"""Smoke test of `python -m ristretto.bench.kernels`: the CPU run times every op and writes well-formed JSON."""
import importlib.util
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


def test_without_out_results_go_to_runs_bench_in_the_working_directory(tmp_path, monkeypatch):
    """Never into the source tree: the default folder is relative to where the command runs."""
    monkeypatch.chdir(tmp_path)
    path = bench_kernels.main(["--ops", "gate_residual"])
    assert path.resolve().parent == (tmp_path / "runs" / "bench").resolve() and path.is_file()
    assert path.with_suffix(".png").is_file() or importlib.util.find_spec("matplotlib") is None


def test_unknown_op_is_named():
    with pytest.raises(SystemExit):
        bench_kernels.parse_args(["--ops", "layernorm_modulate,softmax"])
