"""torch.profiler around a few optimizer steps of a run: a Chrome/Perfetto trace and a top-ops table.

    with profile_steps(run_dir, config.profile.steps) as profiler:
        while training:
            ...  # grad_accum micro-steps, then the optimizer step
            profiler.step()  # once per optimizer step

The first WARMUP_STEPS optimizer steps are skipped (compilation, autotuning, allocator growth) and the profiler's own
warm-up runs on the last of them; the next `steps` steps are recorded with CPU (+ CUDA) activities, shapes and memory,
without Python stacks (they bloat the trace). Then the profiler stops, so later steps run at full speed, and
<run_dir>/profile/ holds trace.json (open in https://ui.perfetto.dev or chrome://tracing) and top_ops.txt (ops by self
device time, then by self CPU time, then by memory). steps = 0 gives a profiler whose step() does nothing.
"""
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

WARMUP_STEPS = 2
TOP_ROWS = 30


def top_ops_text(prof, cuda: bool) -> str:
    """Tables of the recorded ops: by self device time (GPU runs), by self CPU time, by self memory."""
    averages = prof.key_averages(group_by_input_shape=False)
    sections = []
    if cuda:
        sections.append(("by self CUDA time", "self_cuda_time_total"))
    sections.append(("by self CPU time", "self_cpu_time_total"))
    sections.append(("by self memory", "self_cuda_memory_usage" if cuda else "self_cpu_memory_usage"))
    return "\n\n".join(f"== top {TOP_ROWS} ops {title} ==\n{averages.table(sort_by=key, row_limit=TOP_ROWS)}"
                       for title, key in sections)


class StepProfiler:
    """Records optimizer steps WARMUP_STEPS+1 .. WARMUP_STEPS+steps; `step()` after each optimizer step."""

    def __init__(self, run_dir: Path | str, steps: int, warmup: int = WARMUP_STEPS):
        self.out_dir = Path(run_dir) / "profile"
        self.steps, self.warmup, self.calls = steps, warmup, 0
        self.cuda = torch.cuda.is_available()
        self._profiler = None
        if steps > 0:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            # wait + warmup = the skipped steps: the profiler warms itself up on the last skipped one (discarded)
            self._profiler = profile(
                activities=activities, schedule=schedule(wait=max(warmup - 1, 0), warmup=min(warmup, 1), active=steps),
                on_trace_ready=self._write, record_shapes=True, profile_memory=True, with_stack=False)

    @property
    def trace_path(self) -> Path:
        return self.out_dir / "trace.json"

    @property
    def top_ops_path(self) -> Path:
        return self.out_dir / "top_ops.txt"

    def start(self) -> None:
        if self._profiler is not None:
            self._profiler.start()

    def step(self) -> None:
        """Call once per optimizer step; the profiler stops itself once its steps are recorded."""
        if self._profiler is None:
            return
        self.calls += 1
        self._profiler.step()
        if self.calls >= self.warmup + self.steps:
            self.stop()

    def stop(self) -> None:
        if self._profiler is not None:
            profiler, self._profiler = self._profiler, None
            profiler.stop()

    def _write(self, prof) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.trace_path))
        self.top_ops_path.write_text(top_ops_text(prof, self.cuda) + "\n")


@contextmanager
def profile_steps(run_dir: Path | str, steps: int, warmup: int = WARMUP_STEPS):
    """Profile `steps` optimizer steps after `warmup` of them; yields the StepProfiler whose step() the loop calls.
    A run that ends before the window closes still gets whatever steps were recorded."""
    profiler = StepProfiler(run_dir, steps, warmup)
    profiler.start()
    try:
        yield profiler
    finally:
        profiler.stop()
