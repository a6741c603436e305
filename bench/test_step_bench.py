"""pytest-benchmark timings of one CPU-sized training step (fwd + bwd + AdamW) of our Latte and diffusers' twin.

    pytest bench/test_step_bench.py --benchmark-enable      (pytest bench --benchmark-enable --benchmark-only: all)

The config, inputs and step come from bench/step.py (its smoke config), so both benchmarks time the same step.
"""
import pytest
import torch

from ristretto.bench.step import SMOKE_CONFIG, bench_config, cpu_threads, diffusers_twin, make_step, ours, parse_args, \
    random_inputs

BUILDERS = {"ours": ours, "diffusers": diffusers_twin}


@pytest.fixture(autouse=True)
def one_thread():
    with cpu_threads(1):  # smoke sizes: a second thread only adds hand-off cost on shared cores
        yield


@pytest.mark.parametrize("checkpointing", ["none", "full"])
@pytest.mark.parametrize("implementation", list(BUILDERS))
def test_train_step(benchmark, implementation, checkpointing):
    torch.manual_seed(0)
    device = torch.device("cpu")
    config = bench_config(SMOKE_CONFIG, parse_args([]), "fp32", checkpointing)
    model, forward, autocast = BUILDERS[implementation](config, device)
    step = make_step(model, forward, autocast, config, random_inputs(config, config.train.batch_size, device))
    loss = benchmark(step)
    assert torch.isfinite(loss)
