"""Where the Triton launchers launch: the one place that knows the target device, so that what the compile check
(`bench/compile_check.py`) compiles is exactly what runs.

Every launcher asks `target_of(tensor.device)` for what its configuration depends on (interpreter or compiled code,
multiprocessors to fill) and starts its kernel through `launch(kernel, grid)(*args, **meta)` instead of
`kernel[grid](...)`. Normally that is the same call. Inside `recorded_launches(target)` nothing runs: launchers on
CPU tensors configure themselves for `target` (say an H100) and each launch is recorded with its arguments, so the
compile check can compile those very launches for that GPU without one.
"""
import contextlib
import contextvars
import functools
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Target:
    """What a launch configuration may depend on."""

    interpreted: bool
    """True: the Triton CPU interpreter (TRITON_INTERPRET=1), which needs fp32 stand-ins for bf16 outputs and dots."""
    multiprocessors: int
    """Streaming multiprocessors that split reductions try to fill (4 programs each)."""

    @property
    def programs_to_fill(self) -> int:
        """Programs that fill the device; 2 on the interpreter, so CPU tests still walk multi-program reductions."""
        return 2 if self.interpreted else 4 * self.multiprocessors


INTERPRETER = Target(interpreted=True, multiprocessors=1)
HOPPER = Target(interpreted=False, multiprocessors=132)  # H100 SXM and H200 both have 132 SMs

_pretend: contextvars.ContextVar[Target | None] = contextvars.ContextVar("pretend_target", default=None)
_recorder: contextvars.ContextVar[list | None] = contextvars.ContextVar("launch_recorder", default=None)


@functools.lru_cache(maxsize=None)
def _cuda_target(index: int) -> Target:
    return Target(interpreted=False, multiprocessors=torch.cuda.get_device_properties(index).multi_processor_count)


def target_of(device: torch.device) -> Target:
    """The target a launcher configures for: the recorded one inside `recorded_launches`, else the device's own."""
    pretend = _pretend.get()
    if pretend is not None:
        return pretend
    if device.type == "cuda":
        return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER


@dataclass
class Launch:
    """One kernel launch as a launcher made it: the kernel, its grid, positional arguments and keyword meta-parameters
    (constexprs, num_warps, num_stages)."""

    kernel: object
    grid: tuple
    args: tuple
    meta: dict = field(default_factory=dict)


def launch(kernel, grid: tuple):
    """`kernel[grid]`, or inside `recorded_launches` a stand-in that records the call instead of running it."""
    recorder = _recorder.get()
    if recorder is None:
        return kernel[grid]

    def record(*args, **meta):
        recorder.append(Launch(kernel, tuple(grid), args, meta))

    return record


@contextlib.contextmanager
def recorded_launches(target: Target):
    """Within: launchers configure for `target` and record their launches (returned list) instead of running them.
    Kernel outputs stay uninitialised, so only what the launches are, not what they compute, means anything."""
    launches: list[Launch] = []
    pretend_token, recorder_token = _pretend.set(target), _recorder.set(launches)
    try:
        yield launches
    finally:
        _pretend.reset(pretend_token)
        _recorder.reset(recorder_token)


@dataclass(frozen=True)
class LaunchConfig:
    """What a launcher picks at one shape, dtype and target: the grid and the meta-parameters (block constexprs,
    num_warps, num_stages). Each launcher has one function returning this, which the compile check reads too."""

    grid: tuple
    meta: dict
