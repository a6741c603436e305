"""Smoke test of the attention benchmark: it runs every installed backend and writes the table, JSON and chart."""
import json

import pytest
import torch

from ristretto.bench import attention as bench


def test_flop_count_and_peak_lookup(monkeypatch):
    case = bench.Case("c", n=2, sq=3, sk=5, heads=4, dim=8)
    assert case.flops_fwd == 4 * 2 * 3 * 5 * 4 * 8
    assert bench.bf16_peak_tflops(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert bench.bf16_peak_tflops(torch.device("cuda")) == 989.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert bench.bf16_peak_tflops(torch.device("cuda")) == 756.0


def test_latte_shapes():
    spatial, temporal = bench.latte_cases(batch=4, frames=16, tokens_per_frame=256, model="xl")
    assert (spatial.n, spatial.sq, spatial.heads, spatial.dim) == (64, 256, 16, 72)   # [B*F, H*W, heads, dim]
    assert (temporal.n, temporal.sq) == (4 * 256, 16)                               # [B*H*W, F, heads, dim]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run; GPUs run the full benchmark")
def test_smoke_run_writes_results(tmp_path, capsys):
    payload = bench.main(["--out", str(tmp_path), "--backends", "sdpa,sdpa-math,sdpa-efficient"])
    written = json.loads((tmp_path / "attention_cpu.json").read_text())
    assert written["rows"] == payload["rows"] and written["config"]["smoke"]
    assert {"device", "torch", "date"} <= set(written["environment"])
    timed = {(r["case"], r["backend"], r["pass"]) for r in payload["rows"] if r.get("TFLOP/s", 0) > 0}
    for case in ("smoke spatial", "smoke temporal", "smoke cross"):
        for backend in ("sdpa", "sdpa-math"):
            assert {(case, backend, "fwd"), (case, backend, "fwd+bwd")} <= timed
    failed = [r for r in payload["rows"] if r["backend"] == "sdpa-efficient"]
    assert failed and all("use 'sdpa'" in r["note"] for r in failed)  # a kernel that cannot run is a row, not a crash
    assert "TFLOP/s" in capsys.readouterr().out
    pytest.importorskip("matplotlib")
    assert (tmp_path / "attention_cpu.png").stat().st_size > 0
