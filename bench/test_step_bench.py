"""pytest-benchmark timings of one CPU-sized training step (engine.train.train_step) of our Latte and diffusers' twin.

    pytest bench/test_step_bench.py --benchmark-enable      (pytest bench --benchmark-enable --benchmark-only: all)

The config and the step come from bench/step.py (its smoke config and StepRig), so both benchmarks time the
function the training loop runs.
"""
import math

import pytest
import torch

from ristretto.bench.step import SMOKE_CONFIG, StepRig, bench_config, cpu_threads, parse_args


@pytest.fixture(autouse=True)
def one_thread():
    with cpu_threads(1):  # smoke sizes: a second thread only adds hand-off cost on shared cores
        yield


@pytest.mark.parametrize("checkpointing", ["none", "full"])
@pytest.mark.parametrize("implementation", ["ours", "diffusers"])
def test_train_step(benchmark, implementation, checkpointing):
    torch.manual_seed(0)
    config = bench_config(SMOKE_CONFIG, parse_args([]), "fp32", checkpointing)
    rig = StepRig.build(config, torch.device("cpu"), implementation)
    result = benchmark(rig.step)
    assert math.isfinite(result.loss)
