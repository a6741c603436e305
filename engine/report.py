"""report.html: one page per run that a person opens to judge it (no server, no network, nothing to install).

`python -m ristretto.engine.report --run DIR` (or `ristretto-report --run DIR`) rebuilds it from what the run wrote:
config.json, metrics.jsonl, samples/step_<N>/ and status.json. Training rewrites it at every validation (after the
samples, and again after the held-out scores when the run has them) and when train() ends, with status.json saying
how: running / finished / stopped by a signal / failed with the one-line error.

Choices, and why:
- Plots are matplotlib figures embedded as inline PNG (base64 data URIs). matplotlib is the plotting library
  researchers already read, works headless (the Agg canvas, no display) and is an install dependency; PNG rather
  than SVG because an SVG's size grows with the number of points (a 100k-step loss curve is megabytes of path
  data that a browser then re-lays out), while a PNG of a curve is ~30 KB whatever the run's length. Without
  matplotlib the page still renders, with a red banner saying that the plots need it (never silently empty).
- Sample videos are embedded as data URIs (mp4 in <video>, gif in <img>) when each file is at most
  EMBED_LIMIT_BYTES and the page stays under EMBED_BUDGET_BYTES, so report.html alone is the whole report (mail
  it, copy it); other files (large videos, old validations of a long run) are linked by a path relative to the run
  folder, which works when the folder is opened from disk. Every validation step is a row,
  latest first, each video with its caption under it.
- The page carries a few lines of JavaScript that record whether every image and video loaded and any script
  error, as attributes on <html> (data-report-state, data-broken-images, data-broken-videos, data-errors): the
  headless-browser test reads them, and a video the browser cannot play shows a visible note with its file.
"""
import argparse
import base64
import datetime
import html
import io
import json
import logging
import math
import re
import sys
from pathlib import Path

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"
STATUS_NAME = "status.json"
EMBED_LIMIT_BYTES = 2 * 2**20  # per file
EMBED_BUDGET_BYTES = 64 * 2**20  # per page: the newest validations are embedded first, older ones linked beyond it
SMOOTHING = 0.9  # weight of the past in the debiased exponential moving average of the loss (TensorBoard's kind)
STATES = {"running": "running", "finished": "finished", "stopped": "stopped by a signal", "failed": "failed"}
VIDEO_TYPES = {".mp4": "video/mp4", ".webm": "video/webm"}
IMAGE_TYPES = {".gif": "image/gif", ".png": "image/png"}


# --------------------------------------------------------------------------------------------------- status

def write_status(run_dir: Path, state: str, step: int | None = None, detail: str | None = None) -> None:
    """status.json: what the run is doing now; `detail` is the signal's name or the one-line error."""
    if state not in STATES:
        raise ValueError(f"report status {state!r}: expected one of {', '.join(STATES)}")
    record = {"state": state, "step": step, "detail": detail,
              "updated": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}
    atomic_write(Path(run_dir) / STATUS_NAME, json.dumps(record) + "\n")


def read_status(run_dir: Path) -> dict:
    try:
        return json.loads((Path(run_dir) / STATUS_NAME).read_text())
    except (OSError, ValueError):  # a run from before status.json: say what the folder shows
        finished = (Path(run_dir) / "weights").is_dir()
        return {"state": "finished" if finished else "unknown", "step": None,
                "detail": None if finished else f"no {STATUS_NAME} in the run folder", "updated": None}


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text}"


def atomic_write(path: Path, text: str) -> None:
    """A browser refreshing mid-write, or a kill, sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


# -------------------------------------------------------------------------------------------------- metrics

def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict], list[dict]]:
    """metrics.jsonl -> (training step records, quality records, bad-step events); torn lines are skipped."""
    steps, quality, bad = [], [], []
    path = Path(run_dir) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == "bad_step":
            bad.append(record)
        elif any(key.startswith("quality/") for key in record):
            quality.append(record)
        elif isinstance(record.get("loss"), (int, float)):
            steps.append(record)
    return steps, quality, bad


def smoothed(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """Debiased exponential moving average: the first points are not pulled towards zero."""
    out, average = [], 0.0
    for count, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**count))
    return out


def column(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def predicted_peak_gib(config_values: dict, device_type: str) -> float | None:
    """The planner's peak for this run's config (engine/plan.py), or None when it cannot say."""
    try:
        from .config import config_from_dict  # noqa: PLC0415
        from .plan import predict_memory  # noqa: PLC0415

        return predict_memory(config_from_dict(config_values), device_type).peak_bytes / 2**30
    except Exception as error:  # noqa: BLE001 - a report never fails on the planner
        log.warning("report: no memory prediction (%s)", one_line(error))
        return None


# ---------------------------------------------------------------------------------------------------- plots

def new_figure(title: str, ylabel: str):
    from matplotlib.figure import Figure  # noqa: PLC0415 - no pyplot: no global state, no display needed
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

    figure = Figure(figsize=(5.2, 3.0), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    axes.set_title(title, fontsize=10)
    axes.set_xlabel("step", fontsize=9)
    axes.set_ylabel(ylabel, fontsize=9)
    axes.grid(alpha=0.3)
    axes.tick_params(labelsize=8)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    return figure, axes


def figure_png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def plot_all(steps: list[dict], quality: list[dict], bad: list[dict], predicted: float | None) -> list[tuple]:
    """[(title, png data URI)] of every plot the metrics allow."""
    plots = []
    x, loss = column(steps, "loss")
    if x:
        figure, axes = new_figure("loss", "loss")
        axes.plot(x, loss, color="tab:blue", alpha=0.3, linewidth=1, label="raw")
        axes.plot(x, smoothed(loss), color="tab:blue", linewidth=2, label=f"smoothed (EMA {SMOOTHING})")
        axes.legend(fontsize=8)
        plots.append(("loss", figure_png(figure)))
    for key, title in (("lr", "learning rate"), ("grad_norm", "gradient norm (before clipping)")):
        x, values = column(steps, key)
        if x:
            figure, axes = new_figure(title, key)
            axes.plot(x, values, color="tab:orange" if key == "lr" else "tab:purple")
            plots.append((title, figure_png(figure)))
    plots += throughput_plot(steps) + memory_plot(steps, predicted) + quality_plot(quality) + bad_step_plot(bad)
    return plots


def throughput_plot(steps: list[dict]) -> list[tuple]:
    x, samples = column(steps, "samples_per_s")
    if not x:
        return []
    figure, axes = new_figure("throughput", "samples/s")
    axes.plot(x, samples, color="tab:green")
    per_sample = [r["tokens_per_s"] / r["samples_per_s"] for r in steps
                  if r.get("samples_per_s") and "tokens_per_s" in r]
    if per_sample:  # tokens/s is samples/s times the fixed tokens per sample: a second scale, not a second line
        ratio = per_sample[-1]
        twin = axes.secondary_yaxis("right", functions=(lambda s: s * ratio, lambda t: t / ratio))
        twin.set_ylabel("tokens/s", fontsize=9)
        twin.tick_params(labelsize=8)
    return [("throughput", figure_png(figure))]


def memory_plot(steps: list[dict], predicted: float | None) -> list[tuple]:
    cuda = any("peak_memory_gb" in r for r in steps)
    key = "peak_memory_gb" if cuda else "peak_rss_gb"
    x, values = column(steps, key)
    if not x:
        return []
    measured = "torch.cuda.max_memory_allocated" if cuda else "process peak RSS (includes Python and torch)"
    figure, axes = new_figure("peak memory vs the planner", "GiB")
    axes.plot(x, values, color="tab:red", label=measured)
    if predicted is not None:
        axes.axhline(predicted, color="black", linestyle=":", label=f"planner prediction {predicted:.3f} GiB")
    axes.set_ylim(bottom=0)
    axes.legend(fontsize=7)
    return [("peak memory", figure_png(figure))]


def quality_plot(quality: list[dict]) -> list[tuple]:
    keys = sorted({k for r in quality for k in r if k.endswith("_accuracy")})
    if not keys:
        return []
    figure, axes = new_figure("held-out quality", "accuracy")
    for key in keys:
        x, values = column(quality, key)
        axes.plot(x, values, marker="o", label=key.removeprefix("quality/").removesuffix("_accuracy"))
    axes.set_ylim(-0.02, 1.02)
    axes.legend(fontsize=8)
    return [("held-out quality", figure_png(figure))]


def bad_step_plot(bad: list[dict]) -> list[tuple]:
    if not bad:
        return []
    figure, axes = new_figure("bad steps (NaN/inf, optimizer step skipped)", "bad steps so far")
    axes.step([r["step"] for r in bad], [r.get("bad_steps", i + 1) for i, r in enumerate(bad)], where="post",
              color="tab:red", marker="x")
    return [("bad steps", figure_png(figure))]


def plots_or_banner(steps, quality, bad, predicted) -> tuple[list[tuple], str | None]:
    try:
        import matplotlib  # noqa: F401, PLC0415
    except ImportError:
        log.warning("report: matplotlib is not installed, report.html has no plots: pip install matplotlib")
        return [], "No plots: matplotlib is not installed (pip install matplotlib), then rebuild with " \
                   "python -m ristretto.engine.report --run DIR"
    return plot_all(steps, quality, bad, predicted), None


# -------------------------------------------------------------------------------------------------- samples

def sample_rows(run_dir: Path) -> list[tuple[int, list[tuple[Path, str]]]]:
    """[(step, [(media file, caption)])] of every validation, latest first."""
    rows = []
    for folder in (Path(run_dir) / "samples").glob("step_*"):
        match = re.fullmatch(r"step_(\d+)", folder.name)
        if not match or not folder.is_dir():
            continue
        captions = {}
        if (folder / "captions.json").is_file():
            try:
                captions = json.loads((folder / "captions.json").read_text())
            except ValueError:
                captions = {}
        media = sorted(p for p in folder.iterdir() if p.suffix in VIDEO_TYPES or p.suffix == ".gif")
        rows.append((int(match.group(1)), [(p, captions.get(p.name) or caption_from_name(p)) for p in media]))
    return sorted(rows, key=lambda row: -row[0])


def caption_from_name(path: Path) -> str:
    """'03_a_red_circle_moving_left.mp4' -> 'a red circle moving left' (runs from before captions.json)."""
    return re.sub(r"^\d+_", "", path.stem).replace("_", " ")


def media_source(path: Path, run_dir: Path, budget: list[int]) -> str:
    """A data URI while `budget` (bytes left, a one-item list shared by the page) allows, else a relative path."""
    size = path.stat().st_size
    if size <= min(EMBED_LIMIT_BYTES, budget[0]):
        budget[0] -= size
        kind = VIDEO_TYPES.get(path.suffix) or IMAGE_TYPES[path.suffix]
        return f"data:{kind};base64," + base64.b64encode(path.read_bytes()).decode()
    return path.relative_to(run_dir).as_posix()


def media_html(path: Path, caption: str, run_dir: Path, budget: list[int]) -> str:
    source, relative = media_source(path, run_dir, budget), html.escape(path.relative_to(run_dir).as_posix())
    if path.suffix in VIDEO_TYPES:
        element = (f'<video src="{source}" autoplay loop muted playsinline preload="auto" '
                   f'data-file="{relative}"></video>')
    else:
        element = f'<img src="{source}" alt="{html.escape(caption)}" data-file="{relative}">'
    return f'<figure class="sample">{element}<figcaption>{html.escape(caption)}</figcaption></figure>'


def samples_html(run_dir: Path) -> str:
    rows = sample_rows(run_dir)
    if not rows:
        return "<p>No validation samples yet (train.sample_every, and always at the end of a run).</p>"
    parts, budget = [], [EMBED_BUDGET_BYTES]
    for step, media in rows:
        cells = "".join(media_html(path, caption, run_dir, budget) for path, caption in media)
        parts.append(f'<div class="step"><h3>step {step}</h3><div class="row">{cells}</div></div>')
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------------- page

PAGE_SCRIPT = """
(function () {
  const errors = [];
  const root = document.documentElement;
  window.addEventListener("error", function (event) {
    const target = event.target;
    errors.push(target && target !== window ? "failed to load " + (target.dataset.file || target.tagName)
                                            : String(event.message));
  }, true);
  const consoleError = console.error;
  console.error = function () { errors.push(Array.from(arguments).join(" ")); consoleError.apply(console, arguments); };
  function unplayable(video) {
    const note = document.createElement("div");
    note.className = "note";
    note.textContent = "this browser cannot play " + video.dataset.file + "; open the file from the run folder";
    video.after(note);
  }
  function settle() {
    const images = Array.from(document.images);
    const videos = Array.from(document.querySelectorAll("video"));
    const pending = images.some(i => !i.complete) || videos.some(v => !v.error && v.readyState < 2);
    if (pending && Date.now() - start < 15000) { setTimeout(settle, 100); return; }
    videos.filter(v => v.error).forEach(unplayable);
    root.dataset.brokenImages = images.filter(i => !i.complete || i.naturalWidth === 0).length;
    root.dataset.brokenVideos = videos.filter(v => v.error || v.readyState < 2).length;
    root.dataset.images = images.length;
    root.dataset.videos = videos.length;
    root.dataset.errors = JSON.stringify(errors);
    root.dataset.reportState = pending ? "timeout" : "ready";
  }
  const start = Date.now();
  window.addEventListener("load", settle);
})();
"""

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
.status { padding: 0.6em 1em; border-radius: 6px; font-weight: 600; }
.running { background: #e3efff; } .finished { background: #e1f5e1; } .stopped { background: #fff3d6; }
.failed, .unknown, .warning { background: #fde2e2; }
.plots { display: flex; flex-wrap: wrap; gap: 0.5em; }
.plots img { width: 520px; border: 1px solid #ddd; }
.row { display: flex; flex-wrap: wrap; gap: 0.8em; }
figure.sample { margin: 0; width: 140px; }
figure.sample video, figure.sample img { width: 128px; height: 128px; image-rendering: pixelated; background: #000; }
figcaption { font-size: 0.8em; } .note { color: #b00; font-size: 0.75em; }
table { border-collapse: collapse; } td { padding: 0.15em 0.8em 0.15em 0; }
pre { background: #f6f6f6; padding: 0.8em; max-height: 30em; overflow: auto; font-size: 0.8em; }
"""


def summary_rows(config: dict, status: dict, steps: list[dict], quality: list[dict], bad: list[dict]) -> str:
    last = steps[-1] if steps else {}
    rows = [("step", f"{status.get('step') or last.get('step', 0)} of {config.get('train', {}).get('max_steps', '?')}")]
    if last:
        rows += [("last loss", f"{last['loss']:.4f}"), ("last lr", f"{last.get('lr', float('nan')):.3g}")]
        rows.append(("samples/s", f"{last.get('samples_per_s', float('nan')):.1f}"))
    rows.append(("bad steps (skipped)", str(bad[-1].get("bad_steps", len(bad)) if bad else 0)))
    if quality:
        scores = {k.removeprefix("quality/"): v for k, v in quality[-1].items() if k.endswith("_accuracy")}
        rows.append((f"held-out quality (step {quality[-1]['step']})",
                     ", ".join(f"{k} {100 * v:.0f}%" for k, v in scores.items())))
    return "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows)


def build_report(run_dir: Path) -> str:
    """The whole page as one string."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    status = read_status(run_dir)
    steps, quality, bad = read_metrics(run_dir)
    device_type = "cuda" if any("peak_memory_gb" in r for r in steps) else "cpu"
    predicted = predicted_peak_gib(config, device_type) if config and steps else None
    plots, banner = plots_or_banner(steps, quality, bad, predicted)
    state = status.get("state", "unknown")
    headline = STATES.get(state, state) + (f": {status['detail']}" if status.get("detail") else "")
    plot_html = "".join(f'<img src="{uri}" alt="{html.escape(title)}" title="{html.escape(title)}">'
                        for title, uri in plots) or "<p>No metrics yet.</p>"
    title = html.escape(f"{config.get('preset', 'run')}: {run_dir.name}")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>{STYLE}</style><script>{PAGE_SCRIPT}</script></head>
<body>
<h1>{title}</h1>
<p class="status {html.escape(state)}" id="status">{html.escape(headline)}</p>
<p>updated {html.escape(status.get("updated") or "?")} &middot; {html.escape(str(run_dir.resolve()))}</p>
{f'<p class="status warning" id="no-plots">{html.escape(banner)}</p>' if banner else ""}
<table>{summary_rows(config, status, steps, quality, bad)}</table>
<h2>Metrics</h2><div class="plots">{plot_html}</div>
<h2>Samples (latest first)</h2>
{samples_html(run_dir)}
<h2>Resolved config</h2>
<details open><pre>{html.escape(json.dumps(config, indent=2), quote=False)}</pre></details>
</body></html>
"""


def write_report(run_dir: Path) -> Path:
    path = Path(run_dir) / REPORT_NAME
    atomic_write(path, build_report(run_dir))
    return path


def update_report(run_dir: Path, state: str, step: int | None = None, detail: str | None = None) -> Path | None:
    """status.json + report.html, for the training loop: a failure here is logged and never stops training."""
    try:
        write_status(run_dir, state, step, detail)
        return write_report(run_dir)
    except Exception as error:  # noqa: BLE001 - the report is for people; the run matters more
        log.warning("report: could not write %s (%s)", Path(run_dir) / REPORT_NAME, one_line(error))
        return None


def report_end(run_dir: Path, state) -> Path | None:
    """After train() returns: finished, or stopped by a signal (TrainState.stopped_by names it)."""
    if state.stopped_by:
        return update_report(run_dir, "stopped", state.step, state.stopped_by)
    return update_report(run_dir, "finished", state.step)


def report_failure(run_dir: Path, error: BaseException) -> Path | None:
    """After train() raised: failed with the one-line error (a KeyboardInterrupt is a stop, not a failure). Nothing
    is written where the run never started (no config.json: the error came before the run's first file)."""
    if not (Path(run_dir) / "config.json").is_file():
        return None
    if isinstance(error, KeyboardInterrupt):
        return update_report(run_dir, "stopped", detail="KeyboardInterrupt (no checkpoint at this step)")
    return update_report(run_dir, "failed", detail=one_line(error))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ristretto-report", description="Rebuild a run's report.html.")
    parser.add_argument("--run", required=True, type=Path, help="run directory (holds config.json, metrics.jsonl)")
    args = parser.parse_args(argv)
    if not (args.run / "config.json").is_file():
        print(f"report: {args.run / 'config.json'} not found: --run must be a run directory", file=sys.stderr)
        return 2
    print(write_report(args.run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
