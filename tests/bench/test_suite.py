"""The GPU suite: its CPU dry run works end to end; a failing or hanging part is recorded and the suite goes on."""
import json
import os
import subprocess
import sys
import tarfile
import zipfile

from ristretto.bench import suite
from ristretto.bench.suite import Part, run_suite


def test_dry_run_runs_every_part_and_writes_the_summary(tmp_path):
    out, copy = tmp_path / "results", tmp_path / "copy"
    done = subprocess.run([sys.executable, "-m", "ristretto.bench.suite", "--dry-run", "--out", str(out),
                           "--copy-to", str(copy)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for part in suite.PARTS:
        assert f"{part.name:12s}" in done.stdout  # the budget table
        record = json.loads((out / f"{part.name}.json").read_text())
        assert record["status"] == "ok" and record["dry_run"], record.get("error")
    with tarfile.open(copy / "results.tar.gz") as archive:
        assert {f"results/{part.name}.json" for part in suite.PARTS} <= set(archive.getnames())
    assert (copy / "summary.md").read_text() == (out / "summary.md").read_text()
    summary = (out / "summary.md").read_text()
    assert summary.count("| ok |") == len(suite.PARTS)
    environment = json.loads((out / "environment" / "environment.json").read_text())
    assert environment["copy_GBps"] > 0 and environment["bf16_gemm_TFLOPs"] > 0
    parity = json.loads((out / "parity.json").read_text())
    assert parity["headline"]["final loss (last quarter mean)"]["bf16-torch"] > 0


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_failed_and_timed_out_parts_are_recorded_and_the_suite_goes_on(tmp_path):
    parts = [
        Part("fails", "exits 3", 1, gpu=[], smoke=[_python("import sys; print('boom', file=sys.stderr); sys.exit(3)")]),
        Part("hangs", "sleeps past its slice", 1, gpu=[], smoke=[_python("import time; time.sleep(60)")]),
        Part("works", "exits 0", 1, gpu=[], smoke=[_python("print('fine')")]),
    ]
    records = run_suite(parts, budget=30, out_dir=tmp_path, env=None, dry_run=True)
    assert [r["status"] for r in records] == ["failed", "timeout", "ok"]
    assert "boom" in records[0]["error"] and records[0]["commands"][0]["returncode"] == 3
    assert records[1]["seconds"] < 25  # killed at the end of its slice (10 s plus what "fails" left), not after 60 s
    assert json.loads((tmp_path / "works.json").read_text())["commands"][0]["stdout_tail"].strip() == "fine"


def test_a_spent_budget_skips_the_remaining_parts(tmp_path):
    parts = [Part("long", "sleeps", 9, gpu=[], smoke=[_python("import time; time.sleep(60)")]),
             Part("late", "never starts", 1, gpu=[], smoke=[_python("print('never')")])]
    records = run_suite(parts, budget=10, out_dir=tmp_path, env=None, dry_run=True)  # "late" would get 1 s
    assert records[0]["status"] == "timeout"
    assert records[1]["status"] == "skipped" and "budget" in records[1]["error"]


def test_budget_table_scales_the_slices_to_the_budget():
    table = suite.budget_table(suite.PARTS, 270)
    assert abs(sum(row["slice_s"] for row in table) - 270) < 1
    assert [row["part"] for row in table][:2] == ["environment", "gpu-tests"]  # most valuable first


def _tiny_wheel(folder, name="carried_pkg", version="1.0"):
    """A minimal pure-Python wheel holding one module, as pip download would hand one over."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    dist_info = f"{name}-{version}.dist-info"
    files = {f"{name}.py": "VALUE = 42\n",
             f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{dist_info}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{dist_info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as archive:
        for file_name, text in files.items():
            archive.writestr(file_name, text)
    return path


def test_wheels_are_installed_offline_for_every_part(tmp_path):
    _tiny_wheel(tmp_path)
    env = {"PYTHONPATH": "/elsewhere"}
    site = suite.install_wheels(tmp_path, env)
    try:
        assert env["PYTHONPATH"].split(os.pathsep) == [str(site), "/elsewhere"]
        done = subprocess.run([sys.executable, "-c", "import carried_pkg; print(carried_pkg.VALUE)"],
                              env={**os.environ, **env}, capture_output=True, text=True)
        assert done.stdout.strip() == "42", done.stderr
    finally:
        sys.path.remove(str(site))
