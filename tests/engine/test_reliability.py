"""Runs that cannot be corrupted (docs/reliability.md): one writer per run folder (real processes), honest resume
overrides, one `error:` line for every bad input, validation before anything is written, signals in every phase,
manifests in every encoding, checkpoints that verify every file they hold."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from ristretto.engine import train as train_module
from ristretto.engine.checkpoint import (latest_checkpoint, list_checkpoints, load_training_state, prune_checkpoints,
                                         save_checkpoint, verify_checkpoint, CheckpointError)
from ristretto.engine.cli import main as cli_main
from ristretto.engine.config import ConfigError, build_config
from ristretto.engine.run_lock import LOCK_FILE, RunLock, RunLocked

REPO = Path(__file__).resolve().parents[2]
TINY = ["model.hidden_size=32", "model.num_heads=2", "model.depth=1", "data.frames=2", "data.resolution=8",
        "train.batch_size=2", "train.log_every=1", "train.warmup_steps=1", "diffusion.sample_steps=1",
        "sample.num_samples=1"]


def sets(items) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def train_process(run_dir: Path, *extra: str, items=TINY, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *sets(items), "--out", str(run_dir), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for_steps(run_dir: Path, process: subprocess.Popen, steps: int, timeout: float = 240) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if sum("loss" in line for line in lines) >= steps:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {steps} steps logged: {process.poll()}")


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def one_error(capsys) -> str:
    captured = capsys.readouterr()
    lines = error_lines(captured.err)
    assert len(lines) == 1, captured.err[-3000:]
    return lines[0]


# ----------------------------------------------------------------------------------------- one writer per run

def test_a_second_trainer_or_resume_on_a_busy_folder_stops_at_once_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    first = train_process(run_dir, items=TINY + ["train.max_steps=100000"])
    try:
        wait_for_steps(run_dir, first, 2)
        for extra in ((), ("--resume", "auto")):
            started = time.monotonic()
            second = subprocess.run([sys.executable, str(REPO / "train.py"), *sets(TINY), "--out", str(run_dir),
                                     *extra], capture_output=True, text=True, timeout=120)
            assert second.returncode == 2, second.stderr[-3000:]
            (line,) = error_lines(second.stderr)
            assert f"PID {first.pid}" in line and str(run_dir) in line, line
            assert time.monotonic() - started < 60
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=120)
    finally:
        first.kill()
        first.wait()
    assert first.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # one writer: no step twice
    # The lock died with its holder: a resume now takes the folder (and is refused only for the resume's own reason).
    assert RunLock(run_dir).acquire().held


def test_the_lock_is_released_when_its_holder_is_killed(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from ristretto.engine.run_lock import RunLock; "
                               f"RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLocked, match=f"PID {holder.pid}"):
            RunLock(tmp_path).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        holder.kill()
    with RunLock(tmp_path) as lock:  # no stale lock after kill -9
        assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())
        with pytest.raises(RunLocked, match=f"PID {os.getpid()}"):  # a second open in one process is refused too
            RunLock(tmp_path).acquire()
    assert not lock.held


def test_export_into_a_busy_run_is_refused(tmp_path, capsys):
    from ristretto.engine.export import main as export_main

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"preset": "tiny-t2v"}))
    with RunLock(run_dir):
        assert export_main(["--run", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert f"PID {os.getpid()}" in err and not (run_dir / "export").exists()


def test_ctrl_c_during_export_is_one_line_and_releases_the_run(tmp_path, capsys, monkeypatch):
    from ristretto.engine import export as export_module

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "export_run", interrupted)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text("{}")
    assert export_module.main(["--run", str(run_dir)]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert RunLock(run_dir).acquire().held  # the export's lock went with it


def test_pruning_touches_only_finished_checkpoints_and_keep_last_is_checked(tmp_path):
    model = torch.nn.Linear(2, 2)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, None, {"step": step}, keep_last=5)
    root = tmp_path / "checkpoints"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live, dead = root / f".tmp-step_00000004-{sleeper.pid}", root / ".tmp-step_00000004-999999999"
        live.mkdir(), dead.mkdir()
        prune_checkpoints(root, -2)  # a negative count from library code still keeps the newest
        assert live.exists() and not dead.exists()
        assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003"]
    finally:
        sleeper.kill()
        sleeper.wait()
    for bad in ("-2", "0"):
        with pytest.raises(ConfigError, match="train.keep_last"):
            build_config("tiny-t2v", [f"train.keep_last={bad}"])


# ------------------------------------------------------------------------------------------ resume semantics

def test_resume_keeps_earlier_overrides_applies_lr_and_records_history(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert cli_main([*sets(TINY + ["train.max_steps=2", "train.lr=1e-3"]), "--out", str(run_dir)]) == 0
    # Only the new fields on the command line: the run's earlier --sets (width, batch, warm-up...) stay.
    assert cli_main(["--set", "train.max_steps=4", "--set", "train.lr=5e-3", "--resume", "auto",
                     "--out", str(run_dir)]) == 0
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["model"]["hidden_size"] == 32 and saved["train"]["batch_size"] == 2
    assert saved["train"]["lr"] == 5e-3 and saved["train"]["warmup_steps"] == 1
    (entry,) = saved["resumes"]
    assert entry["step"] == 2 and entry["changed"] == {"train.max_steps": [2, 4], "train.lr": [1e-3, 5e-3]}
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("event")) for r in lines] == [(1, None), (2, None), (2, "resume"), (3, None), (4, None)]
    assert [r["lr"] for r in lines if "lr" in r] == [1e-3, 1e-3, 5e-3, 5e-3]  # the new rate is the one used
    state = load_training_state(latest_checkpoint(run_dir))
    assert [group["lr"] for group in state["optimizer"]["param_groups"]] == [5e-3]
    assert state["scheduler"]["base_lrs"] == [5e-3]
    # Fields that decide which samples a step sees, and another preset, are refused with one line; nothing changes.
    before = (run_dir / "config.json").read_text(), (run_dir / "metrics.jsonl").read_text()
    for args, field in ((["--set", "train.max_steps=3"], "train.max_steps"),  # below the checkpoint's step 4
                        (["--set", "train.batch_size=4"], "train.batch_size"),
                        (["--set", "train.grad_accum=2"], "train.grad_accum"),
                        (["--set", "model.depth=2"], "model.depth"), (["--preset", "tiny-class"], "tiny-class")):
        capsys.readouterr()
        assert cli_main([*args, "--resume", "auto", "--out", str(run_dir)]) == 2
        assert field in one_error(capsys)
    assert ((run_dir / "config.json").read_text(), (run_dir / "metrics.jsonl").read_text()) == before


# ----------------------------------------------------------------------- one line for every bad input, up front

BAD_SETTINGS = [("train.lr=nan", "train.lr"), ("train.lr=-1e-3", "train.lr"), ("train.lr=0", "train.lr"),
                ("train.betas=0.9,1.5", "train.betas"), ("train.betas=0.9", "train.betas"),
                ("train.weight_decay=-0.1", "train.weight_decay"),
                ("diffusion.guidance_scale=nan", "diffusion.guidance_scale"),
                ("diffusion.guidance_scale=inf", "diffusion.guidance_scale"),
                ("diffusion.sample_steps=5000", "diffusion.sample_steps"), ("train.keep_last=-2", "train.keep_last"),
                ("data.max_bad_fraction=2", "data.max_bad_fraction"), ("train.grad_clip=-1", "train.grad_clip"),
                ("diffusion.beta_end=2", "diffusion.beta"), ("sample.num_samples=0", "sample.num_samples")]


@pytest.mark.parametrize("setting,field", BAD_SETTINGS)
def test_bad_settings_are_one_line_before_anything_is_written(tmp_path, capsys, setting, field):
    run_dir = tmp_path / "run"
    assert cli_main([*sets(TINY + [setting]), "--out", str(run_dir)]) == 2
    assert field in one_error(capsys)
    assert not run_dir.exists()


def bad_start(tmp_path, capsys, items, field, monkeypatch=None) -> None:
    """A start that fails in set-up: exit 2, one line naming `field`, and the folder it created is gone again."""
    run_dir = tmp_path / "run"
    assert cli_main([*sets(TINY + items), "--out", str(run_dir)]) == 2
    line = one_error(capsys)
    assert field in line, line
    assert not run_dir.exists()


def test_environment_errors_are_one_line(tmp_path, capsys, monkeypatch):
    bad_start(tmp_path, capsys, ["train.precision=fp8-te"], "train.precision=fp8-te")
    bad_start(tmp_path, capsys, ["train.precision=fp8-ao"], "train.precision=fp8-ao")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    bad_start(tmp_path, capsys, ["model.kernels=triton"], "model.kernels=triton")
    empty_model_folder = tmp_path / "vae"  # a local folder without config.json: no hub look-up is attempted
    empty_model_folder.mkdir()
    bad_start(tmp_path, capsys, [f"model.vae={empty_model_folder}"], "model.vae=")
    import importlib.util

    if importlib.util.find_spec("xformers") is None:  # a missing package named by the layer that needs it
        bad_start(tmp_path, capsys, ["model.attention_backend=xformers"], "pip install xformers")


def test_dataset_too_small_and_class_count_are_checked_at_start(tmp_path, capsys):
    bad_start(tmp_path, capsys, ["data.synthetic_size=1"], "train.batch_size=2")
    bad_start(tmp_path, capsys, ["model.kind=class", "model.num_classes=5"], "model.num_classes=5")


def videos_folder(tmp_path) -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    import media_fixtures as media

    folder = tmp_path / "media"
    folder.mkdir()
    media.write_video(folder / "good.mp4", 6, width=16, height=16)
    media.write_corrupt(folder / "bad.mp4")
    return folder


def test_class_folders_beyond_num_classes_and_data_errors_are_one_line(tmp_path, capsys):
    media = videos_folder(tmp_path)
    classes = tmp_path / "classes"
    for index in range(7):
        (classes / f"class_{index}").mkdir(parents=True)
        (classes / f"class_{index}" / "clip.mp4").write_bytes((media / "good.mp4").read_bytes())
    common = ["model.kind=class", "data.kind=class_folders", f"data.root={classes}"]
    bad_start(tmp_path, capsys, common + ["model.num_classes=6"], "model.num_classes=6")
    bad_start(tmp_path, capsys, ["data.kind=class_folders", f"data.root={tmp_path / 'nowhere'}"], "data.root")
    manifest = tmp_path / "only_bad.csv"
    manifest.write_text("path,caption\nbad.mp4,a clip\nmissing.mp4,another\n")
    bad_start(tmp_path, capsys, ["data.kind=captioned", f"data.manifest={manifest}", f"data.root={media}"],
              "unusable")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("path,caption\ngood.mp4,caf\u00e9 au lait\n".encode("latin-1"))
    bad_start(tmp_path, capsys, ["data.kind=captioned", f"data.manifest={latin}", f"data.root={media}"],
              f"{latin}:2: not UTF-8")
    wrong_type = tmp_path / "list.jsonl"
    wrong_type.write_text('{"path": ["good.mp4"], "caption": "x"}\n')
    bad_start(tmp_path, capsys, ["data.kind=captioned", f"data.manifest={wrong_type}", f"data.root={media}"],
              f"{wrong_type}:1: path must be")


def test_manifests_with_bom_nan_times_and_wrong_types(tmp_path):
    from ristretto.engine.video_data import DataError, read_manifest

    bom = tmp_path / "bom.csv"
    bom.write_bytes("path,caption\nclip.mp4,caf\u00e9\n".encode("utf-8-sig"))
    (entry,) = read_manifest(bom)
    assert entry.caption == "caf\u00e9" and entry.path.endswith("clip.mp4")
    bom_jsonl = tmp_path / "bom.jsonl"
    bom_jsonl.write_bytes('{"path": "clip.mp4", "caption": "x", "label": 2}\n'.encode("utf-8-sig"))
    assert read_manifest(bom_jsonl)[0].label == 2
    cases = {"nan.csv": ("path,caption,start\nclip.mp4,x,0\nclip.mp4,y,nan\n", ":3: start must be a finite"),
             "inf.jsonl": ('{"path": "a.mp4", "caption": "x", "end": 1e999}\n', ":1: end must be a finite"),
             "neg.csv": ("path,caption,start\nclip.mp4,x,-1\n", ":2: start must be a finite"),
             "dict.jsonl": ('{"path": "a.mp4", "caption": {"en": "x"}}\n', ":1: caption must be a string"),
             "label.jsonl": ('{"path": "a.mp4", "caption": "x", "label": "two"}\n', ":1: label must be"),
             "bool.jsonl": ('{"path": "a.mp4", "caption": "x", "start": true}\n', ":1: start must be"),
             "badbyte.jsonl": (b'{"path": "a.mp4", "caption": "x"}\n{"path": "b.mp4", "caption": "\xff"}\n',
                               ":2: not UTF-8")}
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(DataError) as caught:
            read_manifest(path)
        assert f"{path}{message}" in str(caught.value), (name, str(caught.value))


def test_a_failed_start_in_an_existing_folder_leaves_it_as_it_was(tmp_path, capsys):
    run_dir = tmp_path / "mine"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("kept")
    assert cli_main([*sets(TINY + ["data.synthetic_size=1"]), "--out", str(run_dir)]) == 2
    one_error(capsys)
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]
    assert cli_main([*sets(TINY + ["train.max_steps=1"]), "--out", str(run_dir)]) == 0  # a plain rerun is accepted


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="synthetic"):
        cli_main([*sets(TINY + ["data.synthetic_size=1"]), "--out", str(tmp_path / "run"), "--debug"])
    monkeypatch.setenv("RISTRETTO_DEBUG", "1")
    with pytest.raises(ConfigError):
        cli_main([*sets(TINY + ["data.synthetic_size=1"]), "--out", str(tmp_path / "run")])


def test_a_fault_after_training_started_exits_1_and_keeps_the_run(tmp_path, capsys, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "run" / "checkpoints"))

    monkeypatch.setattr(train_module, "save_distributed", disk_full)
    run_dir = tmp_path / "run"
    assert cli_main([*sets(TINY + ["train.max_steps=2"]), "--out", str(run_dir)]) == 1
    assert "No space left on device" in one_error(capsys)
    assert (run_dir / "config.json").exists()  # training had started: its folder stays, resumable


# ------------------------------------------------------------------------------------- signals in every phase

def read_until(stream, text: str, process, timeout: float = 240) -> str:
    """Lines of `stream` until one contains `text` (the process's own log says which phase it is in)."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line and process.poll() is not None:
            break
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"{text!r} not seen: {''.join(seen)[-3000:]}")


def test_sigterm_during_set_up_stops_at_once_and_leaves_no_folder(tmp_path):
    run_dir = tmp_path / "run"
    process = train_process(run_dir, env=dict(os.environ, RISTRETTO_TEST_SETUP_DELAY="60"))
    try:
        read_until(process.stderr, "pausing set-up", process)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 143, stderr[-3000:]
    (line,) = error_lines(stderr)
    assert "during set-up" in line and "SIGTERM" in line
    assert not run_dir.exists()


def test_ctrl_c_during_set_up_is_one_line(tmp_path, capsys, monkeypatch):
    real = train_module.build_dataset

    def interrupted_while_loading(config):
        dataset = real(config)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the signal ends this at once
        return dataset

    monkeypatch.setattr(train_module, "build_dataset", interrupted_while_loading)
    assert cli_main([*sets(TINY), "--out", str(tmp_path / "run")]) == 130
    assert "interrupted by SIGINT during set-up" in one_error(capsys)
    assert not (tmp_path / "run").exists()


def test_a_signal_during_final_sampling_stops_it(tmp_path, capsys):
    run_dir = tmp_path / "run"
    items = TINY + ["train.max_steps=2", "diffusion.sample_steps=1000", "sample.num_samples=4"]

    def interrupt_once_weights_are_exported():  # they are exported just before the final samples
        deadline = time.monotonic() + 120
        while not (run_dir / "weights").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    watcher = threading.Thread(target=interrupt_once_weights_are_exported, daemon=True)
    watcher.start()
    started = time.monotonic()
    assert cli_main([*sets(items), "--out", str(run_dir)]) == 130
    assert time.monotonic() - started < 30  # 1000 sampling steps x 4 videos were not run to the end
    assert "stopped by SIGINT at step 2" in capsys.readouterr().err
    assert not (run_dir / "samples").exists()
    assert load_training_state(latest_checkpoint(run_dir))["step"] == 2


def test_a_signal_during_validation_sampling_stops_it_and_checkpoints(tmp_path, monkeypatch):
    def sampling_that_gets_interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)  # the signal ends this at once
        raise AssertionError("sampling was not interrupted")

    monkeypatch.setattr(train_module, "write_validation_samples", sampling_that_gets_interrupted)
    config = build_config("tiny-t2v", TINY + ["train.max_steps=10", "train.sample_every=3"])
    started = time.monotonic()
    state = train_module.train(config, tmp_path / "run")
    assert time.monotonic() - started < 25
    assert state.stopped_by == "SIGINT" and state.step == 3
    assert load_training_state(latest_checkpoint(tmp_path / "run"))["step"] == 3
    assert not (tmp_path / "run" / "weights").exists()


def test_a_second_signal_stops_at_once_without_a_checkpoint(tmp_path, monkeypatch, capsys):
    real = train_module.micro_step_loss

    def signalled_twice(model, diffusion, precision, latents, conditions, first_index, config):
        if first_index == 4:  # inside step 3
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(model, diffusion, precision, latents, conditions, first_index, config)

    monkeypatch.setattr(train_module, "micro_step_loss", signalled_twice)
    run_dir = tmp_path / "run"
    assert cli_main([*sets(TINY + ["train.max_steps=10", "train.ckpt_every=1"]), "--out", str(run_dir)]) == 130
    assert "stopped at once" in one_error(capsys)
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000001", "step_00000002"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


# --------------------------------------------------------------------------------------- checkpoints, threads

def test_a_weight_file_dropped_from_the_manifest_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    train_module.train(build_config("tiny-t2v", TINY + ["train.max_steps=1"]), run_dir)
    checkpoint = latest_checkpoint(run_dir)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    del manifest["files"]["ema.safetensors"]
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    data = (checkpoint / "ema.safetensors").read_bytes()
    (checkpoint / "ema.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="ema.safetensors is not in manifest.json"):
        verify_checkpoint(checkpoint)
    assert latest_checkpoint(run_dir) is None


def _threads_and_policy(load: float) -> list[str]:
    """What a fresh process picks on 3 allowed CPUs (a cgroup/taskset share) with `load` of them busy elsewhere."""
    probe = ("import os; os.sched_getaffinity = lambda pid: {0, 1, 2}; from ristretto.engine import cli; "
             f"cli.busy_cpus = lambda allowed: {load}; "
             "cli.configure_threads(cli.configure_openmp()); import torch; "
             "print(torch.get_num_threads(), os.environ.get('OMP_WAIT_POLICY', 'default'))")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout.split()


def test_cpu_threads_are_the_idle_cpus_of_the_affinity_and_sleep_on_a_loaded_machine(monkeypatch):
    assert _threads_and_policy(0.2) == ["3", "default"]  # idle: every allowed CPU, OpenMP's short spin
    assert _threads_and_policy(1.1) == ["2", "PASSIVE"]  # one CPU busy elsewhere: fewer threads, sleeping when idle
    assert _threads_and_policy(7.0) == ["1", "PASSIVE"]  # overloaded: one thread, never zero
    from ristretto.engine.cli import configure_openmp  # what the user set wins

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert configure_openmp() is None and os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_busy_cpus_reads_the_allowed_cpus_now_not_the_load_average(tmp_path, monkeypatch):
    from ristretto.engine import cli

    stat = tmp_path / "stat"
    stat.write_text("cpu  9 9 9 9 9 9 9 9 0 0\ncpu0 10 0 10 80 0 0 0 0 0 0\ncpu1 1 2 3 4 5 6 7 8 0 0\nintr 5\n")
    assert cli._cpu_times({0}, str(stat)) == {0: (80, 100)}  # only allowed CPUs; idle = idle + iowait
    assert cli._cpu_times({0, 1}, str(stat))[1] == (9, 36)
    with pytest.raises(ValueError, match="none of CPUs"):
        cli._cpu_times({5}, str(stat))
    samples = iter([{0: (80, 100), 1: (50, 100)}, {0: (180, 200), 1: (60, 200)}])  # cpu0 idle, cpu1 90% busy
    monkeypatch.setattr(cli, "_cpu_times", lambda allowed: next(samples))
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (5.0, 5.0, 5.0))  # stale load must not count
    assert cli.busy_cpus({0, 1}, window_s=0) == pytest.approx(0.9)

    def missing(allowed):
        raise OSError("no /proc/stat")

    monkeypatch.setattr(cli, "_cpu_times", missing)  # e.g. macOS: the load average instead
    assert cli.busy_cpus({0, 1}, window_s=0) == 5.0


def test_an_error_reraised_from_a_data_loader_worker_is_still_one_line():
    from torch._utils import ExceptionWrapper

    from ristretto.engine.cli import one_line
    from ristretto.engine.video_data import DataError

    try:
        raise DataError("3 of 5 draws for a batch of 2 were unusable")
    except DataError:
        wrapper = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(DataError) as caught:
        wrapper.reraise()
    assert "Traceback" in str(caught.value)  # what torch hands over: the worker's whole traceback
    assert one_line(caught.value) == "3 of 5 draws for a batch of 2 were unusable"


def test_resume_auto_restarts_a_run_that_stopped_before_its_first_checkpoint(tmp_path, capsys, monkeypatch):
    real = train_module.micro_step_loss

    def fault_in_step_three(model, diffusion, precision, latents, conditions, first_index, config):
        if first_index == 4:
            raise train_module.TrainingFault("simulated fault in step 3")
        return real(model, diffusion, precision, latents, conditions, first_index, config)

    run_dir = tmp_path / "run"
    monkeypatch.setattr(train_module, "micro_step_loss", fault_in_step_three)
    assert cli_main([*sets(TINY + ["train.max_steps=4", "train.lr=2e-3"]), "--out", str(run_dir)]) == 1
    one_error(capsys)
    assert not list_checkpoints(run_dir) and (run_dir / "metrics.jsonl").read_text().count('"loss"') == 2
    monkeypatch.setattr(train_module, "micro_step_loss", real)
    assert cli_main(["--resume", "auto", "--out", str(run_dir)]) == 0  # its saved config, from step 0
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert json.loads((run_dir / "config.json").read_text())["train"]["lr"] == 2e-3
