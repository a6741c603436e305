"""Smoke test of the attention benchmark: every installed backend and the temporal kernel run; table, JSON, chart."""
import json

import pytest
import torch

from ristretto.bench import attention as bench


def test_flop_and_byte_counts_and_peak_lookup(monkeypatch):
    case = bench.Case("c", n=2, sq=3, sk=5, heads=4, dim=8)
    assert case.flops_fwd == 4 * 2 * 3 * 5 * 4 * 8
    q, kv, lse = 2 * 3 * 4 * 8 * 2, 2 * 2 * 5 * 4 * 8 * 2, 2 * 3 * 4 * 4
    assert case.bytes("fwd") == q + kv + q + lse
    assert case.bytes("fwd+bwd") == case.bytes("fwd") + (q + kv + 2 * q + lse) + (q + kv)
    assert bench.bf16_peak_tflops(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert bench.bf16_peak_tflops(torch.device("cuda")) == 989.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert bench.bf16_peak_tflops(torch.device("cuda")) == 756.0


def test_latte_shapes():
    spatial, temporal, from_qkv = bench.latte_cases(batch=4, frames=16, tokens_per_frame=256, model="xl")
    assert (spatial.n, spatial.sq, spatial.heads, spatial.dim) == (64, 256, 16, 72)   # [B*F, H*W, heads, dim]
    assert (temporal.n, temporal.sq) == (4 * 256, 16)                               # [B*H*W, F, heads, dim]
    qkv, frames = bench.make_inputs(bench.Case("t", 2 * 6, 3, 3, 2, 8, kind="temporal", frames=3, tokens=6), "cpu")
    assert qkv.shape == (2 * 3, 6, 3, 2, 8) and frames == 3                          # [B*F, S, 3, heads, dim]
    assert from_qkv.flops_fwd == temporal.flops_fwd and from_qkv.bytes("fwd") == temporal.bytes("fwd")
    cross = bench.latte_cases(batch=2, frames=16, tokens_per_frame=1024, model="t2v", caption=120)[-1]
    assert (cross.n, cross.sq, cross.sk) == (2, 16 * 1024, 120)  # a sample's frames attend as one query row


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run; GPUs run the full benchmark")
def test_smoke_run_writes_results(tmp_path, capsys):
    payload = bench.main(["--out", str(tmp_path), "--backends", "sdpa,sdpa-math,sdpa-efficient"])
    written = json.loads((tmp_path / "attention_cpu.json").read_text())
    assert written["rows"] == payload["rows"] and written["config"]["smoke"]
    assert {"device", "torch", "date"} <= set(written["environment"])
    assert written["config"]["copy_bandwidth_gbps"] > 0
    timed = {(r["case"], r["backend"], r["pass"]) for r in payload["rows"] if r.get("TFLOP/s", 0) > 0}
    for case in ("smoke spatial", "smoke temporal", "smoke cross"):
        for backend in ("sdpa", "sdpa-math"):
            assert {(case, backend, "fwd"), (case, backend, "fwd+bwd")} <= timed
    for backend in ("triton", "sdpa+copies", "sdpa-math+copies", "torch reference"):
        assert {("smoke temporal from qkv", backend, p) for p in ("fwd", "fwd+bwd")} <= timed
    assert all(r["GB/s"] > 0 and r["% of copy bw"] > 0 for r in payload["rows"] if "ms" in r)
    layers = {r["backend"]: r for r in written["layer_rows"]}
    assert set(layers) == {"before (residual copies)", "attention_backend", "triton"}
    assert all(r["ms"] > 0 and r["speedup vs before"] > 0 for r in layers.values())
    failed = [r for r in payload["rows"] if r["backend"] == "sdpa-efficient"]
    assert failed and all("use 'sdpa'" in r["note"] for r in failed)  # a kernel that cannot run is a row, not a crash
    assert "TFLOP/s" in capsys.readouterr().out
    pytest.importorskip("matplotlib")
    assert (tmp_path / "attention_cpu.png").stat().st_size > 0


def test_without_out_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "benchmark_cases", lambda smoke: [bench.Case("tiny", 1, 2, 2, 1, 8)])
    monkeypatch.setattr(bench, "write_results", lambda *a, **k: pytest.fail("wrote results without --out"))
    bench.main(["--backends", "sdpa"])
    assert not any(tmp_path.iterdir())
