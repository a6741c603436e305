"""Attention at Latte's shapes: every backend, and our temporal kernel, forward and forward+backward.

    python -m ristretto.bench.attention [--out DIR] [--backends sdpa,fa2] [--smoke]

Two kinds of cases (bf16, 16 heads x 72, 16 frames; Latte-XL/2 at 16x256^2 = 256 tokens/frame, Latte-1 at 16x512^2 =
1024 tokens/frame):
  sequences  what a backend is handed: spatial [B*F, H*W, heads, dim], temporal [B*H*W, F, heads, dim] already laid
             out, and Latte-1's masked caption cross-attention (the frames of a sample as one query row, 120 T5
             tokens, padded);
  temporal   the model's temporal attention from the qkv projection's output [B*F, S, 3, heads, dim] to the
             output in the spatial layout: `triton` (kernels/temporal_attention.py, no copies), `<backend>+copies`
             (model.temporal_attention=attention_backend: q, k, v copied into frame sequences and the output back),
             and the torch reference twin (eager; compiled too on a GPU).
Layer rows time one spatial + one temporal block, forward + backward (bf16 autocast, Triton LN kernels on a GPU),
with the residual stream moved to [B*S, F, D] and back (before issue 16), through attention_backend, and with the
Triton temporal kernel.
Columns: TFLOP/s (4*N*Sq*Sk*heads*dim forward, 2.5x for forward+backward, flash-attention's convention) and the
fraction of the bf16 peak; GB/s counts the bytes an ideal kernel must move (forward: read q, k, v, write out and the
fp32 logsumexp; backward: read q, k, v, out, dout, logsumexp, write dq, dk, dv) and is compared with the copy
bandwidth measured in the same run. At F=16 temporal attention is memory-bound (about 8 FLOP per byte), so GB/s is
its speed of light. GPU timings use triton.testing.do_bench (median); without a GPU a smoke run on tiny shapes uses a
wall clock and Triton's interpreter: it checks the plumbing, not speed. JSON (+ PNG) is written only to --out.
"""
import argparse
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():  # Triton kernels run in the interpreter on CPU (must precede the first launch)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ristretto.engine.progress import progress_bar  # noqa: E402
from ristretto.bench.common import (bar_chart, copy_bandwidth_gbps, device_name, format_table, time_ms,  # noqa: E402
                                    write_results)
from ristretto.kernels import reference  # noqa: E402
from ristretto.kernels.attention import attention_backend, installed_backends  # noqa: E402
from ristretto.model.attention import attention_over_frames  # noqa: E402

# Dense bf16 tensor-core peak in TFLOP/s, matched against torch.cuda.get_device_name() (first match wins).
BF16_PEAK_TFLOPS = [("h100 pcie", 756.0), ("h100", 989.0), ("h200", 989.0), ("gh200", 989.0), ("b200", 2250.0),
                    ("a100", 312.0), ("l40s", 362.0), ("a10g", 70.0), ("l4", 121.0)]
BACKWARD_FLOP_FACTOR = 2.5  # fwd+bwd FLOPs / fwd FLOPs
LSE_BYTES = 4               # fp32 logsumexp per (query, head)


@dataclass(frozen=True)
class Case:
    name: str
    n: int        # sequences: B*F (spatial), B (cross: a sample's frames are one query row), B*H*W (temporal)
    sq: int
    sk: int
    heads: int
    dim: int
    caption_tokens: int = 0  # > 0: keys are a caption padded to sk, each sequence keeps this many (masked)
    kind: str = "sequences"  # "sequences": q, k, v laid out for the backend; "temporal": from qkv [B*F, S, 3, h, d]
    frames: int = 0          # temporal: F (then n = B*S, sq = sk = F)
    tokens: int = 0          # temporal: S, tokens per frame

    @property
    def flops_fwd(self) -> float:
        return 4.0 * self.n * self.sq * self.sk * self.heads * self.dim

    def bytes(self, pass_name: str, element: int = 2) -> int:
        """What an ideal kernel reads and writes (see the module docstring)."""
        q = out = self.n * self.sq * self.heads * self.dim * element
        kv = 2 * self.n * self.sk * self.heads * self.dim * element
        lse = self.n * self.sq * self.heads * LSE_BYTES
        forward = q + kv + out + lse
        return forward if pass_name == "fwd" else forward + (q + kv + 2 * out + lse) + (q + kv)


def latte_cases(batch: int, frames: int, tokens_per_frame: int, model: str, caption: int = 0) -> list[Case]:
    heads, dim = 16, 72
    cases = [Case(f"{model} spatial", batch * frames, tokens_per_frame, tokens_per_frame, heads, dim),
             Case(f"{model} temporal", batch * tokens_per_frame, frames, frames, heads, dim),
             Case(f"{model} temporal from qkv", batch * tokens_per_frame, frames, frames, heads, dim,
                  kind="temporal", frames=frames, tokens=tokens_per_frame)]
    if caption:
        cases.append(Case(f"{model} cross", batch, frames * tokens_per_frame, caption, heads, dim, caption * 3 // 4))
    return cases


def benchmark_cases(smoke: bool) -> list[Case]:
    if smoke:  # tiny shapes with Latte's head dim: checks every code path in seconds
        return [Case("smoke spatial", 4, 16, 16, 2, 72), Case("smoke temporal", 32, 4, 4, 2, 72),
                Case("smoke temporal from qkv", 2 * 8, 4, 4, 2, 72, kind="temporal", frames=4, tokens=8),
                Case("smoke cross", 1, 4 * 16, 12, 2, 72, caption_tokens=9)]
    return (latte_cases(batch=4, frames=16, tokens_per_frame=256, model="latte-xl2 16x256")
            + latte_cases(batch=2, frames=16, tokens_per_frame=1024, model="latte-1 16x512", caption=120))


def bf16_peak_tflops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None when it is not in the table (the fraction is then left out)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in name), None)


def make_inputs(case: Case, device, dtype=torch.bfloat16):
    """(q, k, v, mask) for a sequences case; (qkv, frames) for a temporal case."""
    gen = torch.Generator().manual_seed(0)
    if case.kind == "temporal":  # [B*F, S, 3, heads, dim] with B = n / S
        rows = case.n // case.tokens * case.frames
        qkv = torch.randn(rows, case.tokens, 3, case.heads, case.dim, generator=gen)
        return qkv.to(device, dtype).requires_grad_(), case.frames
    q, k, v = (torch.randn(case.n, s, case.heads, case.dim, generator=gen).to(device, dtype).requires_grad_()
               for s in (case.sq, case.sk, case.sk))
    mask = None
    if case.caption_tokens:
        mask = (torch.arange(case.sk) < case.caption_tokens).expand(case.n, case.sk).to(device)
    return q, k, v, mask


def triton_temporal_attention():
    from ristretto.kernels.custom_ops import temporal_attention  # noqa: PLC0415 - Triton on demand

    return temporal_attention


def without_projection(temporal_attention_fn):
    """The model's temporal attention with an identity output projection: (qkv, frames) -> [B*F, S, heads*dim]."""
    return lambda qkv, frames: temporal_attention_fn(qkv, frames,
                                                     lambda out, layout: out if layout is None else layout.to_rows(out))


def temporal_implementations(backends: list[str], compile_reference: bool) -> dict:
    """(qkv, frames) -> out in the spatial layout: our kernel, each backend with layout copies, the torch twin
    (eager, and compiled on a GPU: a fused kernel must beat torch.compile of the same ops)."""
    impls = {"triton": triton_temporal_attention}
    for name in backends:
        impls[f"{name}+copies"] = lambda name=name: without_projection(attention_over_frames(attention_backend(name)))
    impls["torch reference"] = lambda: reference.temporal_attention
    if compile_reference:
        impls["torch.compile reference"] = lambda: torch.compile(reference.temporal_attention)
    return impls


def timed_rows(name: str, case: Case, device, peak, copy_gbps, make_fn, inputs) -> list[dict]:
    """Rows for one implementation on `case`: one per pass, or one row saying why it could not run it."""
    base = {"case": case.name, "backend": name}
    try:
        fn = make_fn()
        leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
        grad_out = torch.randn_like(fn(*inputs))

        def forward():
            with torch.no_grad():
                fn(*inputs)

        def forward_backward():
            fn(*inputs).backward(grad_out)

        timings = {"fwd": time_ms(forward, device), "fwd+bwd": time_ms(forward_backward, device, leaves)}
    except (RuntimeError, ValueError, ImportError, NotImplementedError) as error:
        return [{**base, "pass": "-", "note": str(error).splitlines()[0]}]
    rows = []
    for pass_name, ms in timings.items():
        flops = case.flops_fwd * (BACKWARD_FLOP_FACTOR if pass_name == "fwd+bwd" else 1.0)
        gbps = case.bytes(pass_name) / ms / 1e6
        row = {**base, "pass": pass_name, "ms": ms, "TFLOP/s": flops / (ms * 1e-3) / 1e12, "GB/s": gbps,
               "% of copy bw": 100.0 * gbps / copy_gbps}
        if peak:
            row["% of peak"] = 100.0 * row["TFLOP/s"] / peak
        rows.append(row)
    return rows


def bench_case(case: Case, backends: list[str], device, peak, copy_gbps) -> list[dict]:
    inputs = make_inputs(case, device)
    if case.kind == "temporal":
        impls = temporal_implementations(backends, compile_reference=device.type == "cuda")
    else:
        impls = {name: (lambda name=name: attention_backend(name)) for name in backends}
    return [row for name, make_fn in impls.items()
            for row in timed_rows(name, case, device, peak, copy_gbps, make_fn, inputs)]


# ---- one Latte layer (spatial block + temporal block), forward + backward: the layouts before and after ----

@dataclass(frozen=True)
class LayerCase:
    name: str
    batch: int
    frames: int
    tokens: int   # S per frame
    hidden: int
    heads: int


def layer_cases(smoke: bool) -> list[LayerCase]:
    if smoke:
        return [LayerCase("smoke layer", 1, 3, 16, 64, 2)]
    return [LayerCase("latte-xl2 16x256 layer", 4, 16, 256, 1152, 16),
            LayerCase("latte-1 16x512 layer", 2, 16, 1024, 1152, 16)]


def layer_variants(case: LayerCase, device, kernels: str) -> dict:
    """x [B*F, S, D], cond [B, D] -> one layer's output, three ways (same weights): `before` moves the residual stream
    to [B*S, F, D] and back around the temporal block (the layout before issue 16); `attention_backend` keeps it in
    the spatial layout and copies only q, k, v and the attention output; `triton` copies nothing."""
    from ristretto.engine.build import apply_attention_backend, apply_kernels  # noqa: PLC0415
    from ristretto.model.blocks import LatteBlock  # noqa: PLC0415
    from ristretto.model.modulation import AdaLNZero  # noqa: PLC0415

    d, h = case.hidden, case.heads
    torch.manual_seed(0)
    spatial = LatteBlock(d, h, 4.0, AdaLNZero(6, d), cross_attention=False).to(device)
    temporal = LatteBlock(d, h, 4.0, AdaLNZero(6, d), cross_attention=False, temporal=True).to(device)
    on_sequences = LatteBlock(d, h, 4.0, AdaLNZero(6, d), cross_attention=False).to(device)
    on_sequences.load_state_dict(temporal.state_dict())
    for block in (spatial, temporal, on_sequences):
        apply_kernels(block, kernels)
    b, f, t = case.batch, case.frames, case.tokens

    def before(x, cond):
        x = spatial(x, cond).view(b, f, t, d).transpose(1, 2).reshape(b * t, f, d)  # to_temporal: a copy
        return on_sequences(x, cond).view(b, t, f, d).transpose(1, 2).reshape(b * f, t, d)  # to_spatial: a copy

    def after(temporal_attention):
        def make():  # bound when its row is timed, so one failing choice leaves the others running
            apply_attention_backend(temporal, "sdpa", temporal_attention)
            return lambda x, cond: temporal(spatial(x, cond), cond)

        return make

    return {"before (residual copies)": lambda: before, "attention_backend": after("attention_backend"),
            "triton": after("triton")}


def layer_rows(case: LayerCase, device, dtype) -> list[dict]:
    """Forward + backward time of one layer per variant, and its speedup over `before`."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(case.batch * case.frames, case.tokens, case.hidden, generator=gen).to(device).requires_grad_()
    cond = torch.randn(case.batch, case.hidden, generator=gen).to(device)
    rows = []
    for name, make_fn in layer_variants(case, device, "triton" if device.type == "cuda" else "torch").items():
        base = {"case": case.name, "backend": name, "pass": "fwd+bwd"}
        try:
            fn = make_fn()

            def forward_backward():
                with torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
                    out = fn(x, cond)
                out.float().square().mean().backward()

            rows.append({**base, "ms": time_ms(forward_backward, device, [x])})
        except (RuntimeError, ValueError, ImportError, NotImplementedError) as error:
            rows.append({**base, "note": str(error).splitlines()[0]})
    before_ms = rows[0].get("ms")
    for row in rows:
        if before_ms and "ms" in row:
            row["speedup vs before"] = before_ms / row["ms"]
    return rows


def run(out_dir: Path | str | None = None, backends: list[str] | None = None, smoke: bool = False) -> dict:
    """Benchmark every backend on every case; print the table; write JSON (+ PNG) to out_dir when given."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = smoke or device.type != "cuda"
    backends = backends or installed_backends()
    peak = bf16_peak_tflops(device)
    copy_gbps = copy_bandwidth_gbps(device, numel=(1 << 20) if smoke else (1 << 28))
    print(f"copy bandwidth: {copy_gbps:.1f} GB/s on {device_name()}" + (" (smoke run: tiny shapes)" if smoke else ""))
    cases = benchmark_cases(smoke)
    rows = [row for case in progress_bar(cases, desc="attention", unit="case")
            for row in bench_case(case, backends, device, peak, copy_gbps)]
    layer_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    layers = [row for case in layer_cases(smoke) for row in layer_rows(case, device, layer_dtype)]
    print(format_table([{**row, "note": row["note"][:100]} if "note" in row else row for row in rows]))
    print(format_table(layers))
    payload = {"config": {"smoke": smoke, "dtype": "bfloat16", "backends": backends, "bf16_peak_tflops": peak,
                          "copy_bandwidth_gbps": copy_gbps,
                          "timer": "triton.testing.do_bench (median)" if device.type == "cuda" else "wall clock",
                          "cases": [asdict(case) for case in cases]},
               "rows": rows, "layer_rows": layers}
    if out_dir is None:
        print("no results written (pass --out DIR to keep them, e.g. --out bench/results on a GPU)")
        return payload
    path = write_results("attention", payload, out_dir)
    print(f"wrote {path}")
    labels = [f"{case.name} {p}" for case in cases for p in ("fwd", "fwd+bwd")]
    names = list(dict.fromkeys(row["backend"] for row in rows))
    series = {name: [next((r["GB/s"] for r in rows if r["backend"] == name and f"{r['case']} {r['pass']}" == label),
                          0.0) for label in labels] for name in names}
    chart = bar_chart(path.with_suffix(".png"), labels, series, "GB/s (ideal bytes)", f"attention, bf16 ({path.stem})")
    if chart:
        print(f"wrote {chart}")
    return payload


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: write nothing)")
    parser.add_argument("--backends", type=lambda s: s.split(","), default=None,
                        help="comma-separated backend names (default: every installed backend)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (always on without a GPU)")
    args = parser.parse_args(argv)
    return run(args.out, args.backends, args.smoke)


if __name__ == "__main__":
    main()
