"""report.html: written by training at every validation and at the end, with the run's status (finished, stopped
by a signal, failed with its one-line error), plots of the metrics, every validation's videos latest first with
their captions, and the resolved config; rebuilt by `python -m ristretto.engine.report --run DIR`."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from ristretto.engine import train as train_module
from ristretto.engine.config import build_config
from ristretto.engine.report import read_status, report_failure, smoothed, write_report, write_status
from ristretto.engine.train import TrainingFault, train

REPO = Path(__file__).resolve().parents[2]
TINY = ["model.hidden_size=32", "model.num_heads=2", "model.depth=1", "data.frames=2", "data.resolution=8",
        "train.batch_size=2", "train.log_every=1", "train.warmup_steps=1", "diffusion.sample_steps=1",
        "sample.num_samples=2"]


def plots(page: str) -> list[str]:
    return re.findall(r'<img src="data:image/png;base64,[^"]+" alt="([^"]+)"', page)


def sample_steps(page: str) -> list[int]:
    return [int(step) for step in re.findall(r'<div class="step"><h3>step (\d+)</h3>', page)]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A real run: 4 steps, validation every 2 (steps 2 and 4), held-out quality scored at each."""
    run_dir = tmp_path_factory.mktemp("report") / "run"
    train(build_config("tiny-t2v", TINY + ["train.max_steps=4", "train.sample_every=2", "sample.quality_seeds=1"]),
          run_dir)
    return run_dir


def test_a_finished_run_has_a_complete_report(finished_run):
    page = (finished_run / "report.html").read_text()
    assert read_status(finished_run)["state"] == "finished"
    assert '<p class="status finished" id="status">finished</p>' in page
    assert plots(page) == ["loss", "learning rate", "gradient norm (before clipping)", "throughput", "peak memory",
                           "held-out quality"]
    assert sample_steps(page) == [4, 2]  # every validation, latest first
    captions = json.loads((finished_run / "samples" / "step_4" / "captions.json").read_text())
    assert len(captions) == 2
    for caption in captions.values():  # the exact caption under each video, not the file name's slug
        assert page.count(f"<figcaption>{caption}</figcaption>") == 2
    assert page.count("<video src=\"data:video/mp4;base64,") + page.count('<img src="data:image/gif') == 4
    assert '"max_steps": 4' in page  # the resolved config
    assert "colour_accuracy" in page and "http" not in page.replace(str(finished_run.resolve()), "")  # no network


def test_the_report_is_rewritten_at_each_validation(tmp_path, monkeypatch):
    seen = []
    real = train_module.update_report

    def spy(run_dir, state, step=None, detail=None):
        path = real(run_dir, state, step, detail)
        seen.append((state, step, sample_steps(path.read_text())))
        return path

    monkeypatch.setattr(train_module, "update_report", spy)
    train(build_config("tiny-t2v", TINY + ["train.max_steps=3", "train.sample_every=1"]), tmp_path / "run")
    # The last validation's report is the end-of-run one (written once, when train() returns), not a "running" one.
    assert seen == [("running", 1, [1]), ("running", 2, [2, 1])]
    assert read_status(tmp_path / "run")["state"] == "finished"
    assert sample_steps((tmp_path / "run" / "report.html").read_text()) == [3, 2, 1]


def test_a_failed_run_says_why_in_one_line(tmp_path, monkeypatch):
    real = train_module.micro_step_loss

    def poisoned(model, diffusion, precision, latents, conditions, first_index, config):
        return real(model, diffusion, precision, latents, conditions, first_index, config) * float("nan")

    monkeypatch.setattr(train_module, "micro_step_loss", poisoned)
    with pytest.raises(TrainingFault):
        train(build_config("tiny-t2v", TINY + ["train.max_steps=5", "train.max_bad_steps=2"]), tmp_path / "run")
    status = read_status(tmp_path / "run")
    assert status["state"] == "failed" and status["detail"].startswith("TrainingFault: 2 optimizer steps in a row")
    page = (tmp_path / "run" / "report.html").read_text()
    assert '<p class="status failed" id="status">failed: TrainingFault: 2 optimizer steps' in page
    assert "bad steps" in plots(page)


def test_a_run_stopped_by_a_signal_says_so(tmp_path, monkeypatch):
    real = train_module.micro_step_loss

    def interrupt(model, diffusion, precision, latents, conditions, first_index, config):
        if first_index == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(model, diffusion, precision, latents, conditions, first_index, config)

    monkeypatch.setattr(train_module, "micro_step_loss", interrupt)
    train(build_config("tiny-t2v", TINY + ["train.max_steps=50"]), tmp_path / "run")
    assert read_status(tmp_path / "run") | {"updated": None} == {"state": "stopped", "step": 2, "detail": "SIGINT",
                                                                  "updated": None}
    assert "stopped by a signal: SIGINT" in (tmp_path / "run" / "report.html").read_text()


def test_the_command_rebuilds_the_report(finished_run):
    (finished_run / "report.html").unlink()
    result = subprocess.run([sys.executable, "-m", "ristretto.engine.report", "--run", str(finished_run)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert sample_steps((finished_run / "report.html").read_text()) == [4, 2]
    bad = subprocess.run([sys.executable, "-m", "ristretto.engine.report", "--run", str(finished_run / "samples")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--run must be a run directory" in bad.stderr


def test_without_matplotlib_the_report_says_so_loudly(finished_run, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    page = (write_report(finished_run)).read_text()
    assert plots(page) == [] and "No plots: matplotlib is not installed" in page
    assert sample_steps(page) == [4, 2]  # the rest of the report is still there


def test_large_videos_are_linked_not_embedded(finished_run, monkeypatch):
    monkeypatch.setattr("ristretto.engine.report.EMBED_LIMIT_BYTES", 0)
    page = write_report(finished_run).read_text()
    assert re.search(r'<(video|img) src="samples/step_4/00_[^"]+\.(mp4|gif)"', page)
    assert "base64" not in page.split("<h2>Samples")[1]


def test_past_the_page_budget_older_validations_are_linked(finished_run, monkeypatch):
    step_4 = sum(p.stat().st_size for p in (finished_run / "samples" / "step_4").iterdir() if p.suffix != ".png"
                 and p.suffix != ".json")
    monkeypatch.setattr("ristretto.engine.report.EMBED_BUDGET_BYTES", step_4)  # room for the newest row only
    newest, older = write_report(finished_run).read_text().split("<h2>Samples")[1].split("<h3>step 2</h3>")
    assert newest.count("base64,") == 2 and "base64," not in older
    assert re.search(r'<(video|img) src="samples/step_2/00_[^"]+\.(mp4|gif)"', older)


def test_status_and_smoothing_helpers(tmp_path):
    with pytest.raises(ValueError, match="report status 'done'"):
        write_status(tmp_path, "done")
    assert read_status(tmp_path)["state"] == "unknown"
    assert report_failure(tmp_path, ValueError("bad")) is None  # no config.json: the run never started, no report
    assert not (tmp_path / "report.html").exists()
    assert smoothed([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # debiased: no pull towards zero
    assert smoothed([0.0, 10.0], weight=0.5) == pytest.approx([0.0, 20 / 3])  # weights 0.25, 0.5, normalised


# ------------------------------------------------------------------------------ in a real browser (headless Chromium)

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (.ci/run installs Debian's chromium)")


def chromium(page: Path, tmp_path: Path, *action: str) -> subprocess.CompletedProcess:
    """Headless Chromium on file://page with nothing that reaches the network; console messages go to stderr."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium-profile'}", "--enable-logging=stderr", "--v=0",
             "--virtual-time-budget=20000", "--window-size=1300,2400"]
    result = subprocess.run([CHROMIUM, *flags, *action, page.resolve().as_uri()], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def load_state(dom: str) -> dict:
    """The attributes the page's script sets on <html> once every image and video has loaded or failed."""
    tag = re.search(r"<html[^>]*>", dom).group(0)
    return dict(re.findall(r'data-([a-z-]+)="([^"]*)"', tag))


@needs_chromium
def test_chromium_renders_plots_and_videos(finished_run, tmp_path):
    page = finished_run / "report.html"
    result = chromium(page, tmp_path, "--dump-dom")
    state = load_state(result.stdout)
    videos = len(list((finished_run / "samples").glob("step_*/*.mp4")))
    gifs = len(list((finished_run / "samples").glob("step_*/*.gif")))
    assert state == {"broken-images": "0", "broken-videos": "0", "images": str(6 + gifs), "videos": str(videos),
                     "errors": "[]", "report-state": "ready"}, state
    assert videos + gifs == 4
    assert "INFO:CONSOLE" not in result.stderr  # nothing printed to the console: no script errors or warnings

    shot = tmp_path / "report.png"
    chromium(page, tmp_path, f"--screenshot={shot}")
    image = Image.open(shot).convert("RGB")
    assert image.size == (1300, 2400)
    assert len(set(image.resize((130, 240)).getdata())) > 200  # plots and frames drawn, not a blank page
    shutil.copy(shot, finished_run / "report_screenshot.png")  # for a person to look at (pytest --basetemp=DIR)


@needs_chromium
def test_chromium_check_catches_a_broken_video(finished_run, tmp_path):
    """The check can fail: a corrupt video is counted, and the page says which file it cannot play."""
    run_dir = shutil.copytree(finished_run, tmp_path / "run")
    media = sorted((run_dir / "samples" / "step_4").glob("00_*"))[0]
    media.write_bytes(b"not a video")
    write_report(run_dir)
    result = chromium(run_dir / "report.html", tmp_path, "--dump-dom")
    state = load_state(result.stdout)
    assert state["report-state"] == "ready"
    assert int(state["broken-videos"]) + int(state["broken-images"]) == 1, state
    assert f"cannot play samples/step_4/{media.name}" in result.stdout or media.suffix == ".gif"
