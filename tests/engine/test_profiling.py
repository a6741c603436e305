"""profile_steps records exactly the asked-for optimizer steps after the warm-up, and writes the trace and table."""
import json

import pytest
import torch

from ristretto.bench.step import cpu_threads
from ristretto.engine.profiling import profile_steps


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is faster than two, and immune to other processes on shared cores."""
    with cpu_threads(1):
        yield


def tiny_training(profiler, steps: int) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(steps):
        model(torch.randn(8, 16)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        profiler.step()


def profiler_steps_in(trace: dict) -> list[str]:
    names = {event.get("name", "") for event in trace["traceEvents"]}
    return sorted(name for name in names if name.startswith("ProfilerStep#"))


def test_writes_trace_and_top_ops_for_the_window(tmp_path):
    with profile_steps(tmp_path, steps=2) as profiler:
        tiny_training(profiler, steps=6)  # steps 1-2 warm up, 3-4 recorded, 5-6 run unprofiled
    trace = json.loads((tmp_path / "profile" / "trace.json").read_text())
    assert profiler_steps_in(trace) == ["ProfilerStep#2", "ProfilerStep#3"]  # torch counts steps from 0
    top = (tmp_path / "profile" / "top_ops.txt").read_text()
    assert "by self CPU time" in top and "by self memory" in top
    assert "aten::addmm" in top and "Input Shapes" not in top  # op table grouped by op, not by shape
    assert any(event.get("args", {}).get("Input Dims") for event in trace["traceEvents"])  # record_shapes


def test_run_shorter_than_the_window_still_writes(tmp_path):
    with profile_steps(tmp_path, steps=5) as profiler:
        tiny_training(profiler, steps=3)
    recorded = profiler_steps_in(json.loads((tmp_path / "profile" / "trace.json").read_text()))
    assert recorded[0] == "ProfilerStep#2"  # the third optimizer step, then the open (empty) step stop() closes
    assert "ProfilerStep#1" not in recorded


def test_zero_steps_is_a_no_op(tmp_path):
    with profile_steps(tmp_path, steps=0) as profiler:
        tiny_training(profiler, steps=3)
    assert not (tmp_path / "profile").exists()
