"""pytest-benchmark timings of the torch reference ops at CPU sizes (the CPU path of `kernels = "torch"`).

    pytest bench/test_kernels_bench.py --benchmark-enable

Shapes come from the setup factories of bench/kernels.py, so both benchmarks measure the same cases.
"""
import pytest
import torch

from ristretto.bench.kernels import SETUPS, forward_and_backward

CPU_SIZE = dict(batch=1, tokens=64, frames=4, features=256)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("op", list(SETUPS))
def test_reference_op(benchmark, op, mode):
    torch.manual_seed(0)
    case = SETUPS[op](dtype=torch.float32, device=torch.device("cpu"), **CPU_SIZE)
    fwd, fwd_bwd = forward_and_backward(case.impls["torch"], case.inputs)
    benchmark(fwd if mode == "fwd" else fwd_bwd)
