"""What every benchmark shares: the timer, the copy bandwidth, the environment record, the results file, the printed
table and the bar chart."""
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

# Where results go without --out: beside training runs in the working directory (runs/ is git-ignored), never into
# the installed source tree. GPU results meant to be committed are written with --out bench/results.
RESULTS_DIR = Path("runs") / "bench"


def time_ms(fn, device: torch.device, grads=()) -> float:
    """Median milliseconds of fn(): triton.testing.do_bench on a GPU (resetting the .grad of `grads` between calls), a
    wall clock on CPU (one untimed warm-up call, three timed: CPU smoke runs check plumbing, not speed)."""
    if device.type == "cuda":
        import triton.testing  # noqa: PLC0415 - GPU-only dependency

        return triton.testing.do_bench(fn, grad_to_none=list(grads), return_mode="median")
    fn()
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def copy_bandwidth_gbps(device: torch.device, numel: int) -> float:
    """The device's achievable bandwidth: a large bf16 copy (read + write), timed like the kernels it is compared with."""
    src = torch.empty(numel, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / time_ms(lambda: dst.copy_(src), device) / 1e6


def device_name() -> str:
    """A short, file-name-safe device name: 'h100' style for GPUs, 'cpu' otherwise."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    for short in ("h200", "h100", "a100", "l40s", "l4", "a10g", "4090", "3090"):
        if short in name:
            return short
    return name.replace(" ", "-")


def environment_info() -> dict:
    """Device, versions and date, recorded with every result."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }
    try:
        import triton  # noqa: PLC0415 - optional

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def write_results(name: str, payload: dict, out_dir: Path | str | None = None) -> Path:
    """Write `payload` plus the environment as JSON to <out_dir>/<name>_<device>.json and return the path."""
    out_dir = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}_{device_name()}.json"
    path.write_text(json.dumps({"environment": environment_info(), **payload}, indent=2) + "\n")
    return path


def format_table(rows: list[dict]) -> str:
    """Rows of dicts -> an aligned text table (floats to 3 significant digits)."""
    if not rows:
        return "(no rows)"
    columns = list(dict.fromkeys(key for row in rows for key in row))

    def cell(value):
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    cells = [[cell(row.get(col, "")) for col in columns] for row in rows]
    widths = [max(len(col), *(len(r[i]) for r in cells)) for i, col in enumerate(columns)]
    lines = ["  ".join(col.ljust(w) for col, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def bar_chart(path: Path | str, labels: list[str], series: dict[str, list[float]], ylabel: str, title: str) -> Path | None:
    """Grouped bar chart PNG (one group per label, one bar per series); None when matplotlib is missing."""
    try:
        import matplotlib  # noqa: PLC0415 - optional ([dev] extra)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return None
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels)), 4))
    for i, (name, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(labels))], values, width, label=name)
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(labels))], labels, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def write_report(name: str, payload: dict, out_dir, labels: list[str], series: dict[str, list[float]], ylabel: str,
                 title: str) -> Path:
    """The results JSON plus its bar chart beside it (same stem, .png); prints where both went."""
    path = write_results(name, payload, out_dir)
    print(f"wrote {path}")
    chart = bar_chart(path.with_suffix(".png"), labels, series, ylabel, f"{title} ({path.stem})")
    if chart:
        print(f"wrote {chart}")
    return path
