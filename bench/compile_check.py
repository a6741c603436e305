"""Compile every Triton kernel for Hopper (sm_90a) on a CPU, exactly as the launchers launch it at Latte's sizes, and
check what the GPU would get: registers, spills, shared memory, blocks per SM, tensor-core instructions.

    python -m ristretto.bench.compile_check [--out bench/results/compile_check_sm90a.json]

How: every op's forward and backward runs on CPU tensors of Latte-XL/2 (16x256^2) and Latte-1 (16x512^2) sizes
inside `kernels.launch.recorded_launches(HOPPER)`, so each launcher configures itself for an H100/H200 and records
its launches instead of running them (see kernels/launch.py: the configuration functions are the launchers' own, so
this check cannot drift from what runs). Each distinct launch is compiled the way Triton's JIT would on the GPU
(same specialisation of arguments) with `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`; the PTX
goes through the wheel's own `ptxas -v` for the resource report, and its cubin through `cuobjdump -sass` for the
instructions. Exit status 1 (and the report's `failures`) when a kernel fails to compile, spills, needs more shared
memory than an sm_90 block may have, is a GEMM on bf16 inputs without tensor-core instructions (HGMMA or HMMA), has
wgmma serialised by ptxas, or when a `*_kernel` in ristretto.kernels has no case here (add one: the kernel quintet).

Must run without TRITON_INTERPRET (the interpreter replaces compiled kernels); `main` re-executes itself without it.
"""
import argparse
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .common import RESULTS_DIR, format_table

DEFAULT_OUT = RESULTS_DIR / "compile_check_sm90a.json"

# sm_90 (H100 / H200) limits, CUDA programming guide table "Technical Specifications per Compute Capability"
SM90_MAX_SHARED_PER_BLOCK = 232448  # 227 KB opt-in dynamic shared memory per block
SM90_SHARED_PER_SM = 233472  # 228 KB, of which the driver reserves 1 KB per resident block
SM90_REGISTERS_PER_SM = 65536
SM90_MAX_WARPS_PER_SM = 64
SM90_MAX_BLOCKS_PER_SM = 32
REGISTER_ALLOCATION_UNIT = 256  # registers are allocated per warp in units of 256


@dataclass(frozen=True)
class Size:
    """One model size the check compiles at: Latte's width, its latent frames and the latent side."""

    name: str
    frames: int
    latent_side: int
    width: int = 1152
    channels: int = 4
    patch: int = 2
    head_dim: int = 72
    batch: int = 1  # launch configurations depend on the width, not the batch; 1 keeps the CPU tensors small

    @property
    def tokens(self) -> int:
        return (self.latent_side // self.patch) ** 2


SIZES = (Size("latte-xl2-16x256", frames=16, latent_side=32), Size("latte1-16x512", frames=16, latent_side=64))

# The dtypes the training paths hand each op: bf16 autocast keeps the residual stream and the patch embedding
# (a custom op autocast does not cast) in fp32 while branches (attention / MLP / modulation linears)
# come out bf16; the memory-lean path keeps everything bf16; fp32 training keeps everything fp32.
PRECISIONS = {  # forwards of fp32-residual run under bf16 autocast, as training does (ops pick their output dtype)
    "fp32-residual": dict(stream=torch.float32, branch=torch.bfloat16, autocast=True),
    "bf16": dict(stream=torch.bfloat16, branch=torch.bfloat16, autocast=False),
    "fp32": dict(stream=torch.float32, branch=torch.float32, autocast=False),
}


def _leaf(*shape, dtype):
    return torch.randn(*shape, dtype=dtype).requires_grad_()


def _forward_backward(forward, autocast: bool):
    """forward() (under bf16 autocast when asked, as the training forward is), then backward outside it."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        outputs = forward()
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])


def case_patch_embed(size: Size, stream, branch, autocast):
    from ristretto.kernels.custom_ops import patch_embed  # noqa: PLC0415 - kernels import triton

    frames = size.batch * size.frames
    x = _leaf(frames, size.channels, size.latent_side, size.latent_side, dtype=stream)
    weight = _leaf(size.width, size.channels, size.patch, size.patch, dtype=stream)
    bias, pos = _leaf(size.width, dtype=stream), torch.randn(size.tokens, size.width, dtype=stream)
    _forward_backward(lambda: patch_embed(x, weight, bias, pos, size.patch), autocast)


def _layouts(size: Size):
    """(N, S) of the spatial (frames x tokens) and temporal (tokens x frames) blocks; vectors are per sample."""
    return [(size.batch * size.frames, size.tokens), (size.batch * size.tokens, size.frames)]


def case_layernorm_modulate(size: Size, stream, branch, autocast):
    from ristretto.kernels.custom_ops import layernorm_modulate  # noqa: PLC0415

    for n, s in _layouts(size):
        shift, scale = (_leaf(size.batch, size.width, dtype=branch) for _ in range(2))
        x = _leaf(n, s, size.width, dtype=stream)
        _forward_backward(lambda: layernorm_modulate(x, shift, scale), autocast)


def case_gate_residual(size: Size, stream, branch, autocast):
    from ristretto.kernels.custom_ops import gate_residual  # noqa: PLC0415

    for n, s in _layouts(size):
        residual, y = _leaf(n, s, size.width, dtype=stream), _leaf(n, s, size.width, dtype=branch)
        gate = _leaf(size.batch, size.width, dtype=branch)
        _forward_backward(lambda: gate_residual(residual, gate, y), autocast)


def case_temporal_attention(size: Size, stream, branch, autocast):
    from ristretto.kernels.custom_ops import temporal_attention  # noqa: PLC0415

    heads = size.width // size.head_dim  # qkv comes out of a linear: the branch dtype
    qkv = _leaf(size.batch * size.frames, size.tokens, 3, heads, size.head_dim, dtype=branch)
    _forward_backward(lambda: temporal_attention(qkv, size.frames), autocast)


# op -> a function running that op's forward and backward at one size and precision. A new kernel file adds its case.
CASES = {
    "patch_embed": case_patch_embed,
    "layernorm_modulate": case_layernorm_modulate,
    "gate_residual": case_gate_residual,
    "temporal_attention": case_temporal_attention,
}


def record_all_launches(sizes=SIZES, precisions=PRECISIONS) -> dict:
    """{launch key: (Launch, [where it was seen])} over every case, size and precision, recorded for Hopper."""
    from ristretto.kernels.launch import HOPPER, recorded_launches  # noqa: PLC0415

    torch.manual_seed(0)
    launches = {}
    for op, case in CASES.items():
        for size in sizes:
            for precision, dtypes in precisions.items():
                with recorded_launches(HOPPER) as recorded:
                    case(size, **dtypes)
                for launch in recorded:
                    key = launch_key(launch)
                    launches.setdefault(key, (launch, []))[1].append(f"{op}/{size.name}/{precision}")
    return launches


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return str(value.dtype).replace("torch.", "")
    return type(value).__name__


def launch_key(launch) -> str:
    """What decides the compiled code: kernel, argument dtypes, divisibility of integer arguments, meta-parameters."""
    args = ",".join(f"{_arg_type(a)}{'/16' if isinstance(a, int) and a % 16 == 0 else ''}" for a in launch.args)
    meta = ",".join(f"{k}={v}" for k, v in sorted(launch.meta.items()))
    return f"{launch.kernel.__name__}({args}; {meta})"


# ---------------------------------------------------------------------------------------------- compiling


def compile_for_hopper(launch):
    """The CompiledKernel Triton's JIT would build for this launch on an sm_90 GPU (same argument specialisation)."""
    import triton  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource, make_backend  # noqa: PLC0415

    kernel = launch.kernel
    try:
        from triton.runtime.jit import create_function_from_signature  # noqa: PLC0415 - what JITFunction.run uses
    except ImportError:  # another triton (the GPU machine's 3.6): let the JIT compile for the GPU that is there
        return kernel.warmup(*launch.args, grid=launch.grid, **launch.meta)
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*launch.args, **launch.meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.meta, bound_args, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def _nvidia_tool(name: str) -> str:
    """The ptxas that assembles sm_90 in this triton (3.9 bundles two and picks by architecture), or its cuobjdump."""
    from triton.backends.nvidia import compiler  # noqa: PLC0415

    if name == "ptxas":
        try:
            return compiler.get_ptxas(90).path
        except TypeError:  # older triton: one ptxas
            return compiler.get_ptxas().path
    from triton import knobs  # noqa: PLC0415

    return getattr(knobs.nvidia, name).path


def ptxas_report(ptx: str) -> dict:
    """Registers, spills, stack frame and ptxas warnings of the kernel in `ptx`, assembled for sm_90a."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        # the flags triton's own make_cubin passes (3.9), so the numbers are those of the cubin that would run
        flags = ["-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a"]
        done = subprocess.run([_nvidia_tool("ptxas"), *flags, str(source), "-o", str(source.with_suffix(".cubin"))],
                              capture_output=True, text=True)
    log = done.stdout + done.stderr
    if done.returncode:
        raise RuntimeError(f"ptxas failed: {log.strip()}")

    def number(pattern):
        match = re.search(pattern, log)
        return int(match.group(1)) if match else 0

    return {
        "registers": number(r"Used (\d+) registers"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
        "stack_frame": number(r"(\d+) bytes stack frame"),
        "ptxas_warnings": [line.strip() for line in log.splitlines() if "warning" in line.lower()],
    }


def sass_instructions(cubin: bytes) -> dict:
    """Counts of the instructions that say which unit a GEMM runs on."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([_nvidia_tool("cuobjdump"), "-sass", str(path)], capture_output=True, text=True,
                              check=True).stdout
    return {name: len(re.findall(rf"\b{name}\b", sass)) for name in ("HGMMA", "HMMA", "FFMA")}


def blocks_per_sm(registers: int, shared: int, num_warps: int) -> tuple[int, str]:
    """Resident blocks per SM on sm_90 and what limits them (registers, shared memory or warps)."""
    per_warp = -(-registers * 32 // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    limits = {  # on a tie the hardware's fixed limits are named first: registers or shared memory did not limit
        "warps": SM90_MAX_WARPS_PER_SM // num_warps,
        "blocks": SM90_MAX_BLOCKS_PER_SM,
        "registers": (SM90_REGISTERS_PER_SM // per_warp) // num_warps if per_warp else SM90_MAX_BLOCKS_PER_SM,
        "shared": SM90_SHARED_PER_SM // (shared + 1024) if shared else SM90_MAX_BLOCKS_PER_SM,
    }
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter


def check_kernel(launch) -> dict:
    """Compile one launch and report its resources; `failures` lists what breaks the rules above."""
    entry = {"kernel": launch.kernel.__name__, "grid": list(launch.grid),
             "meta": {k: v for k, v in launch.meta.items()},
             "arg_dtypes": sorted({_arg_type(a) for a in launch.args if isinstance(a, torch.Tensor)})}
    started = time.perf_counter()
    try:
        compiled = compile_for_hopper(launch)
        entry.update(ptxas_report(compiled.asm["ptx"]))
        entry["sass"] = sass_instructions(compiled.asm["cubin"])
    except Exception as error:  # noqa: BLE001 - any compiler error is this kernel's failure, reported with its text
        entry["failures"] = [f"does not compile for sm_90a: {type(error).__name__}: {str(error)[:2000]}"]
        return entry
    entry["compile_s"] = round(time.perf_counter() - started, 2)
    entry["shared_bytes"] = compiled.metadata.shared
    entry["num_warps"] = compiled.metadata.num_warps
    entry["blocks_per_sm"], entry["occupancy_limiter"] = blocks_per_sm(entry["registers"], entry["shared_bytes"],
                                                                       entry["num_warps"])
    entry["gemm"] = "tt.dot" in compiled.asm["ttir"]
    entry["tensor_cores"] = "wgmma" if entry["sass"]["HGMMA"] else "mma" if entry["sass"]["HMMA"] else "none"
    entry["failures"] = rule_failures(entry)
    return entry


def rule_failures(entry: dict) -> list[str]:
    """What in one kernel's report breaks the check's rules."""
    failures = []
    if entry["spill_stores"] or entry["spill_loads"]:
        failures.append(f"spills {entry['spill_stores']} B stores / {entry['spill_loads']} B loads")
    if entry["shared_bytes"] > SM90_MAX_SHARED_PER_BLOCK:
        failures.append(f"shared memory {entry['shared_bytes']} B > sm_90 limit {SM90_MAX_SHARED_PER_BLOCK} B")
    if entry["gemm"] and "bfloat16" in entry["arg_dtypes"] and entry["tensor_cores"] == "none":
        failures.append("GEMM on bf16 inputs without tensor-core instructions (no HGMMA/HMMA in SASS)")
    failures += [f"ptxas: {w}" for w in entry["ptxas_warnings"] if "wgmma" in w.lower() and "serializ" in w.lower()]
    return failures


def triton_kernels() -> set[str]:
    """Names of every launched-kind @triton.jit function (`*_kernel`) in the ristretto.kernels package."""
    import ristretto.kernels as package  # noqa: PLC0415

    names = set()
    for module_info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"ristretto.kernels.{module_info.name}")
        for name, value in vars(module).items():
            if name.endswith("_kernel") and hasattr(value, "arg_names") and value.__module__ == module.__name__:
                names.add(name)
    return names


def run_check(sizes=SIZES, precisions=PRECISIONS) -> dict:
    import triton  # noqa: PLC0415

    launches = record_all_launches(sizes, precisions)
    kernels = []
    for key, (launch, seen_in) in launches.items():
        entry = check_kernel(launch)
        entry["used_by"] = seen_in
        kernels.append(entry)
    missing = sorted(triton_kernels() - {entry["kernel"] for entry in kernels})
    failures = [f"{e['kernel']} [{e['used_by'][0]}]: {f}" for e in kernels for f in e["failures"]]
    failures += [f"{name}: no compile-check case launches it (add one to CASES in bench/compile_check.py)"
                 for name in missing]
    ptxas_version = subprocess.run([_nvidia_tool("ptxas"), "--version"], capture_output=True, text=True).stdout
    return {
        "target": "sm_90a (GPUTarget('cuda', 90, 32))",
        "triton": triton.__version__,
        "torch": torch.__version__,
        "ptxas": ptxas_version.strip().splitlines()[-1] if ptxas_version else None,
        "note": "compiled with this triton; the GPU machine runs triton 3.6, whose code generation may differ",
        "sizes": [size.name for size in sizes],
        "precisions": list(precisions),
        "kernels": kernels,
        "failures": failures,
    }


def summary_rows(report: dict) -> list[dict]:
    rows = []
    for e in report["kernels"]:
        meta = e["meta"]
        blocks = " ".join(f"{k.removeprefix('BLOCK_')}={v}" for k, v in meta.items() if k.startswith("BLOCK"))
        flags = " ".join(f"{k}" for k, v in meta.items() if v is True)
        precisions = sorted({used.split("/")[-1] for used in e.get("used_by", [])})
        rows.append({"kernel": e["kernel"].strip("_"), "precisions": ",".join(precisions), "flags": flags,
                     "blocks": blocks, "warps": meta.get("num_warps", ""), "regs": e.get("registers", "-"),
                     "spill": e.get("spill_stores", "-"), "smem": e.get("shared_bytes", "-"),
                     "blk/SM": e.get("blocks_per_sm", "-"), "tc": e.get("tensor_cores", "-"),
                     "ok": "FAIL" if e["failures"] else "ok"})
    return rows


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m ristretto.bench.compile_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="report JSON (default: %(default)s)")
    parser.add_argument("--sizes", nargs="+", choices=[s.name for s in SIZES], default=[s.name for s in SIZES])
    parser.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=list(PRECISIONS))
    parser.add_argument("--list", action="store_true", help="only print the recorded launches (no compiling)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):  # the interpreter has no compiler to ask
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "ristretto.bench.compile_check", *argv], env=env).returncode
    args = parse_args(argv)
    sizes = [s for s in SIZES if s.name in args.sizes]
    if args.list:
        for key, (_, seen_in) in record_all_launches(sizes, {p: PRECISIONS[p] for p in args.precisions}).items():
            print(f"{key}  <- {len(seen_in)} case(s), e.g. {seen_in[0]}")
        return 0
    report = run_check(sizes, {p: PRECISIONS[p] for p in args.precisions})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(format_table(summary_rows(report)))
    print(f"triton {report['triton']}, {report['ptxas']}; wrote {args.out}")
    for failure in report["failures"]:
        print(f"FAIL {failure}")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
