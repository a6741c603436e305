"""Attention backends at Latte's shapes: TFLOP/s and fraction of the device's bf16 peak, forward and forward+backward.

    python -m ristretto.bench.attention [--out DIR] [--backends sdpa,fa2] [--smoke]

Cases (bf16, 16 heads x 72, 16 frames): spatial attention [B*F, H*W, heads, dim] and temporal [B*H*W, F, heads, dim]
for Latte-XL/2 at 16x256^2 (256 tokens/frame) and Latte-1 at 16x512^2 (1024 tokens/frame), plus Latte-1's masked
caption cross-attention (120 T5 tokens, padded). FLOPs: 4*N*Sq*Sk*heads*dim forward (two matmuls), 2.5x that for
forward+backward (flash-attention's convention; recomputation not counted). GPU timings use triton.testing.do_bench
(median); without a GPU a smoke run on tiny shapes uses a wall-clock timer, which checks the plumbing, not speed.
"""
import argparse
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ristretto.bench.common import RESULTS_DIR, bar_chart, format_table, write_results
from ristretto.kernels.attention import attention_backend, installed_backends

# Dense bf16 tensor-core peak in TFLOP/s, matched against torch.cuda.get_device_name() (first match wins).
BF16_PEAK_TFLOPS = [("h100 pcie", 756.0), ("h100", 989.0), ("h200", 989.0), ("gh200", 989.0), ("b200", 2250.0),
                    ("a100", 312.0), ("l40s", 362.0), ("a10g", 70.0), ("l4", 121.0)]
BACKWARD_FLOP_FACTOR = 2.5  # fwd+bwd FLOPs / fwd FLOPs


@dataclass(frozen=True)
class Case:
    name: str
    n: int        # sequences: B*F (spatial, cross) or B*H*W (temporal)
    sq: int
    sk: int
    heads: int
    dim: int
    caption_tokens: int = 0  # > 0: keys are a caption padded to sk, each sequence keeps this many (masked)

    @property
    def flops_fwd(self) -> float:
        return 4.0 * self.n * self.sq * self.sk * self.heads * self.dim


def latte_cases(batch: int, frames: int, tokens_per_frame: int, model: str, caption: int = 0) -> list[Case]:
    heads, dim = 16, 72
    cases = [Case(f"{model} spatial", batch * frames, tokens_per_frame, tokens_per_frame, heads, dim),
             Case(f"{model} temporal", batch * tokens_per_frame, frames, frames, heads, dim)]
    if caption:
        cases.append(Case(f"{model} cross", batch * frames, tokens_per_frame, caption, heads, dim, caption * 3 // 4))
    return cases


def benchmark_cases(smoke: bool) -> list[Case]:
    if smoke:  # tiny shapes with Latte's head dim: checks every code path in seconds
        return [Case("smoke spatial", 4, 16, 16, 2, 72), Case("smoke temporal", 32, 4, 4, 2, 72),
                Case("smoke cross", 4, 16, 12, 2, 72, caption_tokens=9)]
    return (latte_cases(batch=4, frames=16, tokens_per_frame=256, model="latte-xl2 16x256")
            + latte_cases(batch=2, frames=16, tokens_per_frame=1024, model="latte-1 16x512", caption=120))


def bf16_peak_tflops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None when it is not in the table (the fraction is then left out)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in name), None)


def make_inputs(case: Case, device, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(case.n, s, case.heads, case.dim, generator=gen).to(device, dtype).requires_grad_()
               for s in (case.sq, case.sk, case.sk))
    mask = None
    if case.caption_tokens:
        mask = (torch.arange(case.sk) < case.caption_tokens).expand(case.n, case.sk).to(device)
    return q, k, v, mask


def time_ms(fn, device, grads=()) -> float:
    """Median milliseconds of fn(): triton's do_bench on a GPU, a wall clock on CPU."""
    if device.type == "cuda":
        import triton.testing  # noqa: PLC0415 - GPU-only dependency

        return triton.testing.do_bench(fn, grad_to_none=list(grads), return_mode="median")
    fn()  # warm-up
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def bench_backend(name: str, case: Case, device, peak: float | None) -> list[dict]:
    """Rows for `name` on `case`: one per pass, or one row saying why the backend could not run it."""
    base = {"case": case.name, "backend": name}
    try:
        attention = attention_backend(name)
        q, k, v, mask = make_inputs(case, device)
        grad_out = torch.randn_like(q)

        def forward():
            with torch.no_grad():
                attention(q, k, v, mask)

        def forward_backward():
            attention(q, k, v, mask).backward(grad_out)

        timings = {"fwd": time_ms(forward, device), "fwd+bwd": time_ms(forward_backward, device, (q, k, v))}
    except (RuntimeError, ValueError, ImportError, NotImplementedError) as error:
        return [{**base, "pass": "-", "note": str(error).splitlines()[0]}]
    rows = []
    for pass_name, ms in timings.items():
        flops = case.flops_fwd * (BACKWARD_FLOP_FACTOR if pass_name == "fwd+bwd" else 1.0)
        tflops = flops / (ms * 1e-3) / 1e12
        row = {**base, "pass": pass_name, "ms": ms, "TFLOP/s": tflops}
        if peak:
            row["% of peak"] = 100.0 * tflops / peak
        rows.append(row)
    return rows


def run(out_dir: Path | str | None = None, backends: list[str] | None = None, smoke: bool = False) -> dict:
    """Benchmark every backend on every case; print the table, write JSON (+ PNG) to out_dir; return the payload."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = smoke or device.type != "cuda"
    backends = backends or installed_backends()
    peak = bf16_peak_tflops(device)
    cases = benchmark_cases(smoke)
    rows = [row for case in cases for name in backends for row in bench_backend(name, case, device, peak)]
    print(format_table([{**row, "note": row["note"][:100]} if "note" in row else row for row in rows]))
    payload = {"config": {"smoke": smoke, "dtype": "bfloat16", "backends": backends, "bf16_peak_tflops": peak,
                          "timer": "triton.testing.do_bench (median)" if device.type == "cuda" else "wall clock",
                          "cases": [asdict(case) for case in cases]},
               "rows": rows}
    path = write_results("attention", payload, out_dir)
    print(f"wrote {path}")
    labels = [f"{case.name} {p}" for case in cases for p in ("fwd", "fwd+bwd")]
    series = {name: [next((r["TFLOP/s"] for r in rows if r["backend"] == name and f"{r['case']} {r['pass']}" == label),
                          0.0) for label in labels] for name in backends}
    chart = bar_chart(path.with_suffix(".png"), labels, series, "TFLOP/s", f"attention, bf16 ({path.stem})")
    if chart:
        print(f"wrote {chart}")
    return payload


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help=f"results folder (default {RESULTS_DIR})")
    parser.add_argument("--backends", type=lambda s: s.split(","), default=None,
                        help="comma-separated backend names (default: every installed backend)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (always on without a GPU)")
    args = parser.parse_args(argv)
    return run(args.out, args.backends, args.smoke)


if __name__ == "__main__":
    main()
