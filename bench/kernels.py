"""Kernel microbenchmarks: each Triton op vs its torch reference (eager and torch.compile) at Latte sizes.

    python -m ristretto.bench.kernels [--out DIR] [--ops layernorm_modulate,...] [--smoke]

On a GPU: bf16, D=1152, 16 frames, 256 and 1024 tokens per frame, batch 2 and 8; forward and forward+backward timed
with triton.testing.do_bench; achieved GB/s counts the bytes an ideal fused op must move, and is compared with the
device's copy bandwidth measured in the same run. Patch embedding is also compared with Conv2d + reshape + pos add.
Temporal attention is bench/attention.py's temporal case (qkv [B*F, S, 3, heads, 72] -> out in the spatial layout,
its ideal byte count), timed here like every kernel; bench/attention.py also compares it with the attention backends.
Writes a table to stdout, JSON to --out (default runs/bench/ in the working directory) and a bar chart PNG next to
it.

Without CUDA it runs a smoke version: tiny shapes, Triton in the CPU interpreter, a wall-clock timer, no
torch.compile; its JSON says "smoke": true (CPU numbers say nothing about the kernels' speed).
"""
import argparse
import functools
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    # Triton picks interpreter or compiler when a kernel is decorated, so this must precede the kernel imports
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ristretto.engine.progress import progress_bar  # noqa: E402
from ristretto.bench.common import (RESULTS_DIR, bar_chart, copy_bandwidth_gbps, device_name, format_table,  # noqa: E402
                                    time_ms, write_results)
from ristretto.bench import attention  # noqa: E402
from ristretto.kernels import reference  # noqa: E402

OPS = ("patch_embed", "layernorm_modulate", "gate_residual", "temporal_attention")
FRAMES, CHANNELS, PATCH, FEATURES, HEAD_DIM = 16, 4, 2, 1152, 72  # Latte-XL/2 on 4-channel VAE latents
GPU_SIZES = [(2, 256), (8, 256), (2, 1024), (8, 1024)]  # (batch, tokens per frame)
SMOKE = dict(frames=2, features=64, sizes=[(1, 16)])


@dataclass
class Case:
    """One op at one size: its inputs, the bytes an ideal implementation moves, and the implementations to time."""

    op: str
    shape: str
    inputs: tuple
    bytes_fwd: int
    bytes_bwd: int
    impls: dict[str, Callable] = field(default_factory=dict)


def _randn(*shape, dtype, device, grad=True, scale=1.0):
    return (torch.randn(*shape, device=device, dtype=dtype) * scale).requires_grad_(grad)


def _nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def setup_patch_embed(batch, tokens, frames, features, dtype, device) -> Case:
    side = int(tokens**0.5) * PATCH
    x = _randn(batch * frames, CHANNELS, side, side, dtype=dtype, device=device)
    weight = _randn(features, CHANNELS, PATCH, PATCH, dtype=dtype, device=device, scale=0.1)
    bias = _randn(features, dtype=dtype, device=device)
    pos = _randn(tokens, features, dtype=dtype, device=device, grad=False)
    out_bytes = batch * frames * tokens * features * x.element_size()

    def conv2d(x, weight, bias, pos, patch):  # what nn.Conv2d + flatten + transpose + pos add does in eager mode
        return F.conv2d(x, weight, bias, stride=patch).flatten(2).transpose(1, 2) + pos

    return Case(
        "patch_embed", f"x[{batch * frames},{CHANNELS},{side},{side}] D={features}", (x, weight, bias, pos, PATCH),
        bytes_fwd=_nbytes(x, weight, pos) + out_bytes, bytes_bwd=out_bytes + 2 * _nbytes(x, weight),
        impls={"torch": reference.patch_embed, "conv2d": conv2d},
    )


def _activations(batch, tokens, frames, features, dtype, device, count):
    shape = (batch * frames, tokens, features)  # spatial layout; vectors per sample (M = B)
    return [_randn(*shape, dtype=dtype, device=device) for _ in range(count)]


def _vectors(batch, features, dtype, device, count):
    return [_randn(batch, features, dtype=dtype, device=device, scale=0.1) for _ in range(count)]


def setup_layernorm_modulate(batch, tokens, frames, features, dtype, device) -> Case:
    (x,) = _activations(batch, tokens, frames, features, dtype, device, 1)
    shift, scale = _vectors(batch, features, dtype, device, 2)
    act = _nbytes(x)  # fwd reads x, writes out; bwd reads x and dout, writes dx
    return Case("layernorm_modulate", f"[{x.shape[0]},{tokens},{features}] M={batch}", (x, shift, scale),
                bytes_fwd=2 * act, bytes_bwd=3 * act, impls={"torch": reference.layernorm_modulate})


def setup_gate_residual(batch, tokens, frames, features, dtype, device) -> Case:
    residual, y = _activations(batch, tokens, frames, features, dtype, device, 2)
    (gate,) = _vectors(batch, features, dtype, device, 1)
    act = _nbytes(y)  # fwd reads residual and y, writes out; bwd reads dout and y, writes dy (dresidual is dout)
    return Case("gate_residual", f"[{y.shape[0]},{tokens},{features}] M={batch}", (residual, gate, y),
                bytes_fwd=3 * act, bytes_bwd=3 * act, impls={"torch": reference.gate_residual})


def setup_temporal_attention(batch, tokens, frames, features, dtype, device) -> Case:
    """bench/attention.py's temporal case (its inputs and ideal byte count) with Latte's head dim 72."""
    heads = max(1, features // HEAD_DIM)
    spec = attention.Case("temporal_attention", batch * tokens, frames, frames, heads, HEAD_DIM, kind="temporal",
                          frames=frames, tokens=tokens)
    qkv, _ = attention.make_inputs(spec, device, dtype)
    fwd_bytes = spec.bytes("fwd", qkv.element_size())
    return Case("temporal_attention", f"qkv[{','.join(map(str, qkv.shape))}]", (qkv, frames), bytes_fwd=fwd_bytes,
                bytes_bwd=spec.bytes("fwd+bwd", qkv.element_size()) - fwd_bytes,
                impls={"torch": reference.temporal_attention})


SETUPS = {op: globals()[f"setup_{op}"] for op in OPS}


# ---------------------------------------------------------------------------------------------- timing


def forward_and_backward(fn, inputs):
    """fn's forward, and a callable running forward + backward to every input that requires grad."""
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    outs = fn(*inputs)
    douts = [torch.randn_like(o) for o in (outs if isinstance(outs, tuple) else (outs,))]

    def fwd():
        with torch.no_grad():
            return fn(*inputs)

    def fwd_bwd():
        outs = fn(*inputs)
        return torch.autograd.grad(outs if isinstance(outs, tuple) else (outs,), leaves, douts)

    return fwd, fwd_bwd


def bench_case(case: Case, triton_op, timer, copy_gbps, use_compile) -> list[dict]:
    impls = {"triton": triton_op, **case.impls}
    if use_compile:
        impls["torch.compile"] = torch.compile(case.impls["torch"])
    rows = []
    for mode, nbytes in (("fwd", case.bytes_fwd), ("fwd+bwd", case.bytes_fwd + case.bytes_bwd)):
        eager_ms = None
        for name, fn in impls.items():
            fwd, fwd_bwd = forward_and_backward(fn, case.inputs)
            ms = timer(fwd if mode == "fwd" else fwd_bwd)
            eager_ms = ms if name == "torch" else eager_ms
            gbps = nbytes / ms / 1e6
            rows.append({"op": case.op, "shape": case.shape, "mode": mode, "impl": name, "ms": ms, "GB/s": gbps,
                         "frac_copy_bw": gbps / copy_gbps})
        for row in rows[-len(impls):]:
            row["speedup_vs_eager"] = eager_ms / row["ms"]
    return rows


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help=f"directory for the JSON and PNG (default {RESULTS_DIR} in the working directory)")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes even on a GPU (always on without CUDA)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.ops.split(",")) - set(OPS))
    if unknown:
        parser.error(f"--ops: unknown op(s) {unknown}; expected a subset of {list(OPS)}")
    return args


def main(argv=None) -> Path | None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from ristretto.kernels import custom_ops  # noqa: PLC0415 - after TRITON_INTERPRET is settled

    on_gpu = torch.cuda.is_available()
    smoke = args.smoke or not on_gpu
    device = torch.device("cuda" if on_gpu else "cpu")
    frames, features, sizes = (SMOKE["frames"], SMOKE["features"], SMOKE["sizes"]) if smoke else (
        FRAMES, FEATURES, GPU_SIZES)
    dtype = torch.bfloat16
    timer = functools.partial(time_ms, device=device)
    torch.manual_seed(0)
    copy_gbps = copy_bandwidth_gbps(device, numel=(1 << 20) if smoke else (1 << 28))
    print(f"copy bandwidth: {copy_gbps:.1f} GB/s on {device_name()}" + (" (smoke run: tiny shapes)" if smoke else ""))

    rows = []
    cases = [(op, batch, tokens) for op in args.ops.split(",") for batch, tokens in sizes]
    for op, batch, tokens in progress_bar(cases, desc="kernels", unit="case"):
        case = SETUPS[op](batch, tokens, frames, features, dtype, device)
        rows += bench_case(case, getattr(custom_ops, op), timer, copy_gbps, use_compile=on_gpu)
        del case
    print(format_table(rows))

    out_dir = args.out if args.out is not None else RESULTS_DIR  # a CPU smoke run's JSON says "smoke": true
    payload = {
        "config": {"dtype": str(dtype), "frames": frames, "features": features, "patch": PATCH,
                   "sizes_batch_tokens": sizes, "smoke": smoke, "timer": "do_bench median" if on_gpu else "wall clock"},
        "copy_bandwidth_gbps": copy_gbps,
        "rows": rows,
    }
    path = write_results("kernels", payload, out_dir)
    fwd_bwd = [row for row in rows if row["mode"] == "fwd+bwd"]
    labels = list(dict.fromkeys(f"{row['op']}\n{row['shape']}" for row in fwd_bwd))
    series = {impl: [next((r["GB/s"] for r in fwd_bwd if f"{r['op']}\n{r['shape']}" == label and r["impl"] == impl),
                          0.0) for label in labels]
              for impl in dict.fromkeys(row["impl"] for row in fwd_bwd)}
    bar_chart(path.with_suffix(".png"), labels, series, "GB/s (fwd+bwd)", f"Ristretto kernels on {device_name()}")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
