"""README's commands, run as written (with tiny settings where a command would train for minutes): docs match code.

Every line of a ```bash block in README.md and every inline `python ...`, `torchrun ...`, `ristretto-...` or
`pip ...` span must match exactly one rule in RULES (a new command without a rule fails
test_every_readme_command_has_one_rule). How each kind is checked, and why:
  run     run as written in a scratch working directory; training commands get `--set train.max_steps=2 --set
          diffusion.sample_steps=4` appended (the point is that the command works, not that it trains for a minute);
          DIR and runs/my-run name the tiny run that README's own `--out runs/my-run` command trains first
  help    a usage line with placeholders ([--preset NAME] ...): `--help` must work
  config  needs data, downloads or a GPU (UCF-101, T5-XXL, the SD VAE, Latte-1 / PixArt weights): its preset and
          every --set are resolved with build_config (the weight folders taken as holding the preset's shape), so a
          renamed preset or field fails here, but nothing trains
  bench   `python -m ristretto.bench.kernels | attention | step | memory`: each --help works, and the kernels smoke
          run (one op) writes its JSON where the README says (runs/bench/ in the working directory)
  slow    run as written, but only with `pytest -m slow`: `python -m ristretto.bench.memory --smoke` takes ~1.5
          CPU-minutes (its per-layer rows run Triton kernels in the interpreter)
  skip    pip install (what .ci/run does before this suite), pytest (this suite), torchrun with 8 processes
          (tests/engine/test_torchrun.py runs the same CLI under torchrun with 2), `hf download` (nothing downloads
          at test time) and the export of the fine-tuned run that needs those downloads (the same export command
          runs on the tiny run as `--run DIR`)
"""
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ristretto.engine.config import build_config

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
TRAIN_TINY = ["--set", "train.max_steps=2", "--set", "diffusion.sample_steps=4"]
MY_RUN = "runs/my-run"
RULES = [  # (pattern the whole command must match, kind)
    (r"pip install .*", "skip"),
    (r"pytest", "skip"),
    (r"ristretto-bench NAME", "help"),
    (r"torchrun .*", "skip"),
    (r"hf download .*", "skip"),
    (r"python -m ristretto\.engine\.export --run runs/latte-ft", "skip"),
    (r"python train\.py --preset latte-t2v-512 --set model\.init(_spatial)?=.*", "config"),
    (r"python train\.py \[.*\]", "help"),
    (r"python train\.py( --preset synthetic-proof)?", "run"),
    (r"python train\.py --set model\.depth=4 .* --out runs/my-run", "run"),
    (r"python train\.py --resume auto --out DIR", "run"),
    (r"python train\.py --preset latte-xl2-ucf .*", "config"),
    (r"python -m ristretto\.engine\.cache --preset .*", "config"),
    (r"python -m ristretto\.engine\.(sample|report|export) --run (DIR|runs/my-run)( .*)?", "run"),
    (r"ristretto-export --run DIR", "run"),
    (r"python -m ristretto\.engine\.plan .*", "run"),
    (r"python -m ristretto\.bench\.quality --run DIR.*", "run"),
    (r"python -m ristretto\.bench\.loss_parity --baseline .*", "help"),
    (r"python -m ristretto\.bench\.kernels \| attention \| step \| memory", "bench"),
    (r"python -m ristretto\.bench\.memory --smoke", "slow"),
]


def readme_commands() -> list[str]:
    """Commands in README order: lines of ```bash blocks, then inline spans that start with a command; `a && b`
    is two commands."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        lines += [re.sub(r"\s+#.*$", "", line).strip() for line in block.replace("\\\n", " ").splitlines()
                  if line.strip() and not line.strip().startswith("#")]
    lines += [" ".join(span.split()) for span in re.findall(r"`((?:python|torchrun|ristretto-\w+|pip) [^`]*)`", README)]
    return [part.strip() for line in lines for part in line.split(" && ")]


def kinds_of(command: str) -> list[str]:
    return [kind for pattern, kind in RULES if re.fullmatch(pattern, command)]


def kind_of(command: str) -> str | None:
    """The command's one kind; None when no rule or several match (test_every_readme_command_has_one_rule fails)."""
    kinds = kinds_of(command)
    return kinds[0] if len(kinds) == 1 else None


def run(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    assert result.returncode == 0, f"{shlex.join(args)} failed:\n{result.stdout[-1500:]}\n{result.stderr[-3000:]}"
    return result


def as_argv(command: str) -> list[str]:
    """A README command -> argv here: this interpreter, the repo's train.py, placeholders -> the tiny run."""
    argv = shlex.split(command.replace(" DIR", f" {MY_RUN}").replace(" FILE", " quality.json"))
    if argv[0] == "python":
        argv[0] = sys.executable
    if argv[1:2] == ["train.py"]:
        argv[1] = str(REPO / "train.py")
        if "--resume" not in argv:
            argv += TRAIN_TINY
    if argv[0].startswith("ristretto-"):  # the console script, as installed next to this interpreter
        argv[0] = str(Path(sys.executable).parent / argv[0])
    if "ristretto.bench.quality" in argv:
        argv += ["--seeds", "1"]  # 12 held-out captions x 1 noise seed instead of x 4
    return argv


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The scratch working directory, holding runs/my-run trained by README's own command (2 steps)."""
    cwd = tmp_path_factory.mktemp("readme")
    train_my_run = next(c for c in readme_commands() if c.endswith(f"--out {MY_RUN}"))
    run(as_argv(train_my_run), cwd)
    return cwd


def test_every_readme_command_has_one_rule():
    commands = readme_commands()
    assert len(commands) >= 15, commands  # the extraction found the README's commands
    for command in commands:
        kinds = kinds_of(command)
        assert len(kinds) == 1, f"README command {command!r} matches {len(kinds)} rules in tests/test_readme.py"


@pytest.mark.parametrize("command", [c for c in readme_commands() if kind_of(c) == "run"])
def test_run_commands_work_as_written(command, workdir):
    argv = as_argv(command)
    if not Path(argv[0]).exists():
        pytest.skip(f"{argv[0]} not installed here: pip install -e . installs the console scripts")
    if command.startswith("python train.py") and "--out" not in argv:  # the default runs/<preset>-<time>
        before = set((workdir / "runs").iterdir())
        run(argv, workdir)
        (new_run,) = set((workdir / "runs").iterdir()) - before
        assert (new_run / "report.html").is_file() and json.loads((new_run / "status.json").read_text())[
            "state"] == "finished"
    elif command.endswith(f"--out {MY_RUN}"):
        assert (workdir / MY_RUN / "report.html").is_file()  # the fixture ran it
    else:
        run(argv, workdir)
    if " --run " in command:
        assert (workdir / MY_RUN / "report.html").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c in readme_commands() if kind_of(c) == "slow"])
def test_slow_commands_work_as_written(command, tmp_path):
    run(as_argv(command), tmp_path, timeout=1200)
    assert list((tmp_path / "runs" / "bench").glob("*.json"))  # where the README says benchmarks write


@pytest.mark.parametrize("command", [c for c in readme_commands() if kind_of(c) == "help"])
def test_usage_lines_have_working_help(command, tmp_path):
    argv = as_argv(command.split(" [")[0] if " [" in command else command.replace(" NAME", ""))
    result = subprocess.run([a for a in argv if a not in TRAIN_TINY] + (["--help"] if "[" in command else []),
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert "usage" in (result.stdout + result.stderr).lower()


@pytest.mark.parametrize("command", [c for c in readme_commands() if kind_of(c) == "config"])
def test_commands_that_need_data_or_a_gpu_name_real_presets_and_fields(command, monkeypatch):
    from ristretto.engine import pretrained  # noqa: PLC0415

    # model.init / model.init_spatial name folders of downloaded weights (not here): as if they held the preset's shape
    monkeypatch.setattr(pretrained, "find_pretrained",
                        lambda key, path: pretrained.Pretrained(key, "latte", [Path(path)], {}))
    monkeypatch.setattr(pretrained, "check_pretrained_keys", lambda config, found: None)
    argv = shlex.split(command)
    preset = argv[argv.index("--preset") + 1]
    overrides = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--set"]
    config = build_config(preset, overrides)
    for override in overrides:
        key, value = override.split("=", 1)
        section, field = key.split(".")
        actual = getattr(getattr(config, section), field)
        assert actual == (type(actual)(value) if isinstance(actual, (int, float)) else value), override


def test_benchmarks_have_help_and_write_json_where_the_readme_says(tmp_path, monkeypatch, capsys):
    """In this process (each `python -m` start costs seconds): the module's main() is what `python -m` runs."""
    (command,) = [c for c in readme_commands() if kind_of(c) == "bench"]
    names = [part.strip() for part in command.removeprefix("python -m ristretto.bench.").split("|")]
    for name in names:
        with pytest.raises(SystemExit) as exit_info:
            importlib.import_module(f"ristretto.bench.{name}").main(["--help"])
        assert exit_info.value.code == 0 and "usage" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    importlib.import_module("ristretto.bench.kernels").main(["--ops", "gate_residual"])
    assert "runs/bench/<name>_<device>.json" in README
    results = json.loads((tmp_path / "runs" / "bench" / "kernels_cpu.json").read_text())
    assert results["config"]["smoke"] is True and results["rows"]
    assert not (REPO / "bench" / "results" / "kernels_cpu.json").exists()  # never into the source tree


def test_every_console_script_resolves_to_a_main():
    scripts = set(re.findall(r'"(ristretto-[a-z]+)=', (REPO / "setup.py").read_text()))
    assert {"ristretto-train", "ristretto-export", "ristretto-report"} <= scripts
    installed = {ep.name: ep for ep in importlib.metadata.entry_points(group="console_scripts")
                 if ep.name.startswith("ristretto-")}
    if set(installed) != scripts:
        pytest.skip(f"the installed scripts {sorted(installed)} predate setup.py: pip install -e . again")
    assert all(callable(ep.load()) for ep in installed.values())


def test_files_and_modules_the_docs_name_exist():
    texts = {"README.md": README} | {f"docs/{p.name}": p.read_text() for p in (REPO / "docs").glob("*.md")}
    for name, text in texts.items():
        if name == "README.md":  # docs/ also cite other projects' files (torchao's docs/source/...)
            for path in re.findall(r"\b((?:docs|engine|bench|model|kernels|tests)/[\w/.]+\.(?:md|py|png))", text):
                assert (REPO / path).exists(), f"{name} names {path}, which a clone does not have"
        for module in re.findall(r"python -m (ristretto(?:\.\w+)++)(?!\.\.)", text):  # not a quote cut with "..."
            assert importlib.util.find_spec(module) is not None, f"{name} names {module}, which does not exist"
    assert "DESIGN.md" not in README  # the shared design file is not in a clone; docs/design.md is
