"""Every GPU check in one call, under a hard time budget: a rare, short GPU loan turned into committed evidence.

    python -m ristretto.bench.suite [--budget 540] [--out DIR] [--copy-to DIR] [--wheels DIR] [--dry-run]
    ristretto-bench suite [same arguments]

Parts run in value order, each in its own subprocesses with its own timeout: its share of the budget plus whatever
earlier parts left unused, never past the budget's end. A part that fails or runs out of time is recorded with its
error and the suite goes on. Each part calls a benchmark through its command line only (`python -m
ristretto.bench.<name> ...`), so a change inside a benchmark module cannot break the suite, only that part.

    environment  GPU, memory, driver, CUDA, versions; measured copy bandwidth and bf16 GEMM TFLOP/s (the
                 denominators of every ratio below)
    gpu-tests    pytest -m gpu -x -q (compiled Triton kernels, attention backends, precision, sync-free step)
    kernels      bench/kernels.py: each Triton kernel vs eager and torch.compile, fraction of copy bandwidth
    attention    bench/attention.py: attention backends incl. the temporal kernel
    step         bench/step.py at Latte-XL/2 16x256^2 and Latte-1 16x512^2: eager / compile / triton / fp8-ao vs
                 diffusers; samples/s, MFU, peak memory
    memory       bench/memory.py with the device capped to 80 GiB (torch.cuda.set_per_process_memory_fraction), so an
                 H200 answers for an 80 GB H100: planner vs measured peak, largest batch found vs planned
    parity       a few hundred steps of the tiny synthetic preset: bf16 torch vs triton vs fp8-ao loss curves
    default-run  the README's default training command, timed on the GPU
    compile      bench/compile_check.py with the machine's own triton (the committed report is from CI's triton)

Writes <part>.json per part (status, seconds, each command's exit status and output tail, the JSON results the
benchmark wrote) and summary.md under --out (default bench/results/<date>-<gpu>/); with --copy-to DIR, also
summary.md and a .tar.gz of the whole folder there, refreshed after every part (a killed run still hands back its
finished parts). `--wheels DIR` installs the wheels in DIR (diffusers, torchao, ...) into a temporary site folder
first, for every part. `--dry-run` (CPU is fine) runs every part's smoke version instead, concurrently, and prints the
budget table; CI runs it.
docs/gpu.md says how to carry wheels to the GPU machine and run this there.
"""
import argparse
import concurrent.futures
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
MIN_PART_SECONDS = 5  # a part is not started with less than this left of the budget
SMOKE_TIMEOUT_S = 240  # a smoke version's least timeout: a busy shared CPU, not the GPU's budget, sets its pace
TAIL_CHARS = 3000
PY = sys.executable


@dataclass
class Part:
    name: str
    answers: str
    share: float  # seconds of the default 540 s budget; scaled with --budget
    gpu: list  # commands (argv lists); "{out}" is replaced by the part's output folder
    smoke: list  # the CPU version run by --dry-run
    summarize: object = None  # (part folder, record) -> dict of headline numbers


def _bench(name, *args):
    return [PY, "-m", f"ristretto.bench.{name}", *args]


def _train(out, *overrides):
    """A short run of the tiny synthetic text-to-video preset into `out` (one cheap validation sample at the end:
    sample.num_samples=0 fails in engine/sample.py)."""
    quiet = ("sample.num_samples=1", "diffusion.sample_steps=2", "train.log_every=10")
    sets = [item for o in (*quiet, *overrides) for item in ("--set", o)]
    return [PY, "train.py", "--preset", "tiny-t2v", *sets, "--out", out]


# The memory part caps the allocator before the benchmark module runs, then runs it as `python -m` would.
CAP_80_GIB = ("import runpy, sys, torch; total = torch.cuda.get_device_properties(0).total_memory; "
              "torch.cuda.set_per_process_memory_fraction(min(1.0, 80 * 2**30 / total)); "
              "sys.argv = ['ristretto.bench.memory', *sys.argv[1:]]; "
              "runpy.run_module('ristretto.bench.memory', run_name='__main__')")

PARITY_STEPS = 300
PARITY_VARIANTS = {  # name -> train overrides
    "bf16-torch": ("train.precision=bf16", "model.kernels=torch"),
    "bf16-triton": ("train.precision=bf16", "model.kernels=triton"),
    # fp8-ao requires compile; fp8_linears=shape: the FP8 rule would keep every linear of this small model in bf16
    "fp8-ao": ("train.precision=fp8-ao", "model.kernels=torch", "train.compile=true", "train.fp8_linears=shape"),
}


class MissingResults(Exception):
    """A part's commands exited 0 but did not write what its summary reads: the part failed."""


def parity_summary(folder: Path, record: dict) -> dict:
    """Mean training loss over the last quarter of each variant's logged steps, and each one's gap to bf16-torch."""
    means = {}
    variants = [Path(c["argv"][-1]).name for c in record["commands"] if c["status"] == "ok"]
    for variant in variants:
        path = folder / variant / "metrics.jsonl"
        losses = [json.loads(line).get("loss") for line in path.read_text().splitlines()] if path.exists() else []
        losses = [loss for loss in losses if isinstance(loss, (int, float))]
        if losses:
            tail = losses[-max(1, len(losses) // 4):]
            means[variant] = sum(tail) / len(tail)
        else:
            raise MissingResults(f"no losses in {path}")
    base = means.get("bf16-torch")
    gaps = {f"{v} - bf16-torch": m - base for v, m in means.items() if base is not None and v != "bf16-torch"}
    return {"final loss (last quarter mean)": means, **gaps}


def environment_summary(folder: Path, record: dict) -> dict:
    path = folder / "environment.json"
    if not path.exists():
        raise MissingResults(f"{path} was not written")
    env = json.loads(path.read_text())
    keys = ("device", "copy_GBps", "bf16_gemm_TFLOPs", "torch", "triton", "diffusers", "torchao")
    return {k: env.get(k) for k in keys}


def compile_summary(folder: Path, record: dict) -> dict:
    path = folder / "compile_check_sm90a.json"
    if not path.exists():
        return {}
    report = json.loads(path.read_text())
    return {"triton": report.get("triton"), "kernels": len(report.get("kernels", [])),
            "failures": report.get("failures", [])}


PARTS = [
    Part("environment", "device, versions, copy GB/s and bf16 GEMM TFLOP/s", 25,
         gpu=[[PY, "-m", "ristretto.bench.suite", "--environment", "{out}"]],
         smoke=[[PY, "-m", "ristretto.bench.suite", "--environment", "{out}"]], summarize=environment_summary),
    Part("gpu-tests", "pytest -m gpu: compiled kernels, attention backends, precision, sync-free step", 90,
         gpu=[[PY, "-m", "pytest", "-m", "gpu", "-x", "-q", "-p", "no:cacheprovider"]],
         smoke=[[PY, "-m", "pytest", "-m", "gpu", "-q", "--collect-only", "-p", "no:cacheprovider",
                 "tests/kernels/test_patch_embed.py"]]),
    Part("kernels", "each Triton kernel vs eager / torch.compile, fraction of copy bandwidth", 50,
         gpu=[_bench("kernels", "--out", "{out}")], smoke=[_bench("kernels", "--help")]),
    Part("attention", "attention backends at Latte's shapes, incl. the temporal kernel", 40,
         gpu=[_bench("attention", "--out", "{out}")], smoke=[_bench("attention", "--help")]),
    Part("step", "train step at Latte-XL/2 16x256^2 and Latte-1 16x512^2: ours eager/compile/triton/fp8-ao vs "
                 "diffusers", 150,
         gpu=[_bench("step", "--configs", "xl2-t2v,t2v512", "--checkpointing", "full", "--steps", "5",
                     "--variants", "eager,diffusers", "--out", "{out}/eager"),
              _bench("step", "--configs", "xl2-t2v,t2v512", "--checkpointing", "full", "--steps", "5",
                     "--kernels", "triton", "--out", "{out}/triton"),
              _bench("step", "--configs", "xl2-t2v", "--checkpointing", "full", "--steps", "5", "--compile",
                     "--out", "{out}/compile"),
              _bench("step", "--configs", "xl2-t2v", "--checkpointing", "full", "--steps", "5", "--compile",
                     "--precision", "fp8-ao", "--out", "{out}/fp8-ao")],
         smoke=[_bench("step", "--smoke", "--steps", "1", "--checkpointing", "none", "--out", "{out}")]),
    Part("memory", "planner vs measured peak with the device capped to 80 GiB; largest batch found vs planned", 75,
         gpu=[[PY, "-c", CAP_80_GIB, "--configs", "xl2-t2v,t2v512", "--modes", "none,full,selective-mlp,auto",
               "--out", "{out}"]],
         smoke=[_bench("memory", "--help")]),
    Part("parity", f"{PARITY_STEPS} steps of tiny-t2v: bf16 torch vs triton vs fp8-ao loss", 55,
         gpu=[_train(f"{{out}}/{name}", f"train.max_steps={PARITY_STEPS}", *sets)
              for name, sets in PARITY_VARIANTS.items()],
         smoke=[_train("{out}/bf16-torch", "train.max_steps=2", "train.log_every=1", "train.batch_size=1",
                       "data.frames=2")],
         summarize=parity_summary),
    Part("loader", "data loader clips/s at 0/2/8 workers against the step's consumption", 10,
         gpu=[_bench("loader", "--out", "{out}")], smoke=[_bench("loader", "--help")]),
    Part("default-run", "the README's default `python train.py` (tiny-t2v) on the GPU: minutes, not CPU minutes", 25,
         gpu=[[PY, "train.py", "--out", "{out}/run"]], smoke=[[PY, "train.py", "--help"]]),
    Part("compile", "every Triton kernel compiled for sm_90a by the machine's triton: registers, spills, smem", 20,
         gpu=[_bench("compile_check", "--out", "{out}/compile_check_sm90a.json")],
         smoke=[_bench("compile_check", "--list", "--sizes", "latte-xl2-16x256", "--precisions", "bf16")],
         summarize=compile_summary),
]


# ---------------------------------------------------------------------------------------------- running


def _tail(text: str | bytes | None) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-TAIL_CHARS:]


def run_command(argv: list[str], timeout: float, env: dict) -> dict:
    """Run one command in its own process group (killed whole on timeout); its exit status, time and output tails."""
    started = time.monotonic()
    process = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=max(1.0, timeout))
        status = "ok" if process.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        status = "timeout"
    return {"argv": argv, "status": status, "returncode": process.returncode,
            "seconds": round(time.monotonic() - started, 1), "stdout_tail": _tail(stdout), "stderr_tail": _tail(stderr)}


def _results_in(folder: Path) -> dict:
    """Every JSON a part's benchmarks wrote (path relative to the folder -> content)."""
    found = {}
    for path in sorted(folder.rglob("*.json")):
        try:
            found[str(path.relative_to(folder))] = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            found[str(path.relative_to(folder))] = f"unreadable: {error}"
    return found


def run_part(part: Part, seconds: float, out_dir: Path, env: dict, dry_run: bool) -> dict:
    """All of a part's commands within `seconds`; later commands get what earlier ones left."""
    folder = out_dir / part.name
    folder.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + seconds
    commands = []
    for template in (part.smoke if dry_run else part.gpu):
        left = deadline - time.monotonic()
        argv = [arg.replace("{out}", str(folder)) for arg in template]
        if left < 1:
            commands.append({"argv": argv, "status": "skipped", "error": "the part's time was spent"})
            continue
        commands.append(run_command(argv, left, env))
    statuses = {c["status"] for c in commands}
    status = "ok" if statuses == {"ok"} else "timeout" if "timeout" in statuses else "failed"
    record = {"part": part.name, "answers": part.answers, "status": status, "budget_s": round(seconds, 1),
              "seconds": round(sum(c.get("seconds", 0) for c in commands), 1), "dry_run": dry_run,
              "commands": commands}
    if status != "ok":
        bad = next(c for c in commands if c["status"] != "ok")
        lines = (bad.get("stderr_tail") or bad.get("stdout_tail") or bad.get("error", "")).strip().splitlines()
        record["error"] = f"{bad['status']}: {' '.join(bad['argv'][1:4])} ...: {lines[-1] if lines else ''}"
    if part.summarize is not None:
        try:
            record["headline"] = part.summarize(folder, record)
        except (MissingResults, OSError, ValueError, KeyError, TypeError) as error:
            message = f"results: {type(error).__name__}: {error}"
            if status == "ok":  # the commands said ok, but what they should have written is not there
                record["status"], record["error"] = "failed", message
            else:
                record["headline"] = {"error": message}
    record["results"] = _results_in(folder)
    return record


def budget_table(parts: list[Part], budget: float) -> list[dict]:
    """Each part's own slice of the budget (time unused by earlier parts is added when they finish)."""
    scale = budget / sum(p.share for p in parts)
    return [{"part": p.name, "slice_s": round(p.share * scale, 1), "commands": len(p.gpu), "answers": p.answers}
            for p in parts]


def _finish(record: dict, out_dir: Path) -> dict:
    (out_dir / f"{record['part']}.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(f"[suite] {record['part']:12s} {record['status']:8s} {record['seconds']:6.1f}s / {record['budget_s']:.0f}s"
          + (f"  {record['error']}" if record.get("error") else ""), flush=True)
    return record


def run_suite(parts: list[Part], budget: float, out_dir: Path, env: dict, dry_run: bool, after_part=None) -> list[dict]:
    """Run `parts` in order within `budget` seconds; `after_part(records so far)` is called after each part."""
    start = time.monotonic()
    scale = budget / sum(p.share for p in parts)
    records, planned_end = [], 0.0
    for part in parts:
        planned_end += part.share * scale
        elapsed = time.monotonic() - start
        seconds = min(planned_end, budget) - elapsed  # its slice plus what earlier parts left
        if budget - elapsed < MIN_PART_SECONDS or seconds < MIN_PART_SECONDS:
            record = {"part": part.name, "answers": part.answers, "status": "skipped", "seconds": 0,
                      "budget_s": round(max(0.0, seconds), 1), "error": "the suite's budget was spent"}
        else:
            record = run_part(part, seconds, out_dir, env, dry_run)
        records.append(_finish(record, out_dir))
        if after_part is not None:
            after_part(records)
    return records


def run_smoke_concurrently(parts: list[Part], budget: float, out_dir: Path, env: dict, workers: int) -> list[dict]:
    """The dry run: every part's CPU smoke version at once (they share nothing), each with its own slice as timeout.
    On a GPU parts run one after another, so that timings do not disturb each other."""
    scale = budget / sum(p.share for p in parts)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(run_part, part, max(part.share * scale, SMOKE_TIMEOUT_S), out_dir, env, True)
                   for part in parts]
        return [_finish(future.result(), out_dir) for future in futures]


def summary_markdown(records: list[dict], budget: float, dry_run: bool) -> str:
    lines = [f"# Ristretto GPU suite{' (dry run: CPU smoke versions)' if dry_run else ''}", "",
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, budget {budget:.0f} s, "
             f"used {sum(r['seconds'] for r in records):.0f} s", "",
             "| part | status | seconds | slice | headline / error |", "| --- | --- | --- | --- | --- |"]
    for r in records:
        detail = r.get("error") or json.dumps(r.get("headline") or sorted(r.get("results", {})), default=str)
        detail = detail.replace("|", "/").replace("\n", " ")[:400]
        lines.append(f"| {r['part']} | {r['status']} | {r['seconds']:.0f} | {r['budget_s']:.0f} | {detail} |")
    lines += ["", "Each part's commands, exit status, output tails and result JSON: `<part>.json` beside this file."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- environment part


def measure_environment(folder: Path) -> dict:
    """Versions, device, and the two ceilings: device-to-device copy bandwidth (bytes read + written) and a bf16
    GEMM on random data (8192^3 on a GPU; tiny on a CPU, where the numbers only prove the plumbing)."""
    import platform  # noqa: PLC0415

    import torch  # noqa: PLC0415

    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("triton", "diffusers", "torchao", "transformers", "xformers", "transformer_engine"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - missing or broken: recorded as absent
            info[name] = None
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, memory_GiB=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count, capability=f"{props.major}.{props.minor}")
        smi = shutil.which("nvidia-smi")
        if smi:
            query = subprocess.run([smi, "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                    "--format=csv,noheader"], capture_output=True, text=True)
            info["nvidia_smi"] = query.stdout.strip()
    else:
        info["device"] = platform.processor() or "cpu"
    copy_elements, gemm_size = (2**28, 8192) if cuda else (2**20, 256)  # 1 GiB fp32 per buffer on a GPU
    source = torch.randn(copy_elements, device=device)
    target = torch.empty_like(source)
    copy_s = _time(lambda: target.copy_(source), cuda)
    info["copy_GBps"] = round(2 * source.numel() * source.element_size() / copy_s / 1e9, 1)
    a = torch.randn(gemm_size, gemm_size, device=device, dtype=torch.bfloat16)
    b = torch.randn(gemm_size, gemm_size, device=device, dtype=torch.bfloat16)
    gemm_s = _time(lambda: a @ b, cuda)
    info["bf16_gemm_TFLOPs"] = round(2 * gemm_size**3 / gemm_s / 1e12, 2)
    info["timing"] = "median of 20 after 3 warm-ups" + (", CUDA events" if cuda else ", wall clock")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "environment.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info, indent=1))
    return info


def _time(fn, cuda: bool, warmup: int = 3, reps: int = 20) -> float:
    """Median seconds of fn()."""
    import statistics  # noqa: PLC0415

    import torch  # noqa: PLC0415

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            begin_s = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin_s)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------- entry point


def copy_results(out_dir: Path, copy_to: Path) -> Path:
    """Two files in `copy_to`: summary.md and <out_dir name>.tar.gz of the whole results folder. Few, flat files,
    because that is what a GPU machine's hand-back folder takes (the device tool: 8 files, 2 folders deep)."""
    copy_to.mkdir(parents=True, exist_ok=True)
    shutil.copy2(out_dir / "summary.md", copy_to / "summary.md")
    partial = copy_to / f"{out_dir.name}.tar.gz.partial"
    with tarfile.open(partial, "w:gz") as archive:
        archive.add(out_dir, arcname=out_dir.name)
    return partial.replace(copy_to / f"{out_dir.name}.tar.gz")


def gpu_short_name() -> str:
    """'h200' style name from nvidia-smi (no torch import in the parent before --wheels is applied); 'cpu' if none."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return "cpu"
    query = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    name = query.stdout.strip().splitlines()[0].lower() if query.returncode == 0 and query.stdout.strip() else "gpu"
    return next((short for short in ("h200", "h100", "a100", "l40s", "l4") if short in name), name.replace(" ", "-"))


def install_wheels(wheel_dir: Path, env: dict) -> Path:
    """pip-install every wheel in `wheel_dir` (offline, no dependencies) into a temporary site folder, put it first
    on this process's path and on every part's PYTHONPATH; returns the folder."""
    wheels = sorted(wheel_dir.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"--wheels: no .whl files in {wheel_dir}")
    site = Path(tempfile.mkdtemp(prefix="ristretto-wheels-"))
    subprocess.run([PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
                    "--target", str(site), *map(str, wheels)], check=True)
    sys.path.insert(0, str(site))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return site


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m ristretto.bench.suite", description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=540, help="hard limit in seconds for all parts (%(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results/<date>-<gpu>/)")
    parser.add_argument("--copy-to", type=Path, default=None,
                        help="also write summary.md and a .tar.gz of the results here (refreshed after every part)")
    parser.add_argument("--wheels", type=Path, default=None, help="install the wheels in this folder first")
    parser.add_argument("--parts", type=lambda s: s.split(","), default=[p.name for p in PARTS],
                        help=f"comma-separated subset of {','.join(p.name for p in PARTS)}")
    parser.add_argument("--dry-run", action="store_true", help="CPU smoke version of every part + the budget table")
    parser.add_argument("--environment", type=Path, default=None, help=argparse.SUPPRESS)  # the environment part
    args = parser.parse_args(argv)
    unknown = [name for name in args.parts if name not in {p.name for p in PARTS}]
    if unknown:
        parser.error(f"--parts: unknown {unknown}; expected names from {', '.join(p.name for p in PARTS)}")
    if args.budget <= 0:
        parser.error(f"--budget: must be positive, got {args.budget}")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.environment is not None:
        measure_environment(args.environment)
        return 0
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.wheels is not None:
        print(f"[suite] wheels installed into {install_wheels(args.wheels, env)}")
    parts = [p for p in PARTS if p.name in args.parts]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    out_dir = args.out or RESULTS_DIR / f"{stamp}-{'dry-run' if args.dry_run else gpu_short_name()}"
    out_dir.mkdir(parents=True, exist_ok=True)
    table = budget_table(parts, args.budget)
    print("\n".join(f"{row['part']:12s} {row['slice_s']:6.1f}s  {row['commands']} command(s)  {row['answers']}"
                    for row in table), flush=True)

    def save(records):  # after every part, so a run killed from outside still leaves what it finished
        (out_dir / "summary.md").write_text(summary_markdown(records, args.budget, args.dry_run))
        if args.copy_to is not None:
            copy_results(out_dir, args.copy_to)

    if args.dry_run:
        records = run_smoke_concurrently(parts, args.budget, out_dir, env, workers=min(4, os.cpu_count() or 1))
        save(records)
    else:
        records = run_suite(parts, args.budget, out_dir, env, dry_run=False, after_part=save)
    print(f"[suite] wrote {out_dir}/summary.md" + (f", copied to {args.copy_to}" if args.copy_to else ""))
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
