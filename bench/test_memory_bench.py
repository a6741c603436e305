"""pytest-benchmark timings of the memory planner (the fit search calls it dozens of times) and of the saved-tensor
measurement bench/memory.py runs on CPU.

    pytest bench/test_memory_bench.py --benchmark-enable      (pytest bench --benchmark-enable --benchmark-only: all)
"""
import pytest

from ristretto.bench.memory import SMOKE_CONFIGS, case_config, measure_saved_bytes
from ristretto.bench.step import cpu_threads
from ristretto.engine.config import build_config
from ristretto.engine.plan import GIB, largest_that_fits, predict_memory


@pytest.fixture(autouse=True)
def one_thread():
    with cpu_threads(1):
        yield


@pytest.mark.parametrize("preset", ["latte-xl2-ucf", "latte-t2v-512"])
def test_predict_memory(benchmark, preset):
    config = build_config(preset)
    plan = benchmark(predict_memory, config)
    assert plan.peak_bytes > plan.activation_bytes > 0


def test_largest_batch_search(benchmark):
    config = build_config("latte-xl2-ucf")
    assert benchmark(largest_that_fits, config, "batch", 80 * GIB) >= 1


@pytest.mark.parametrize("mode", ["none", "full"])
def test_measure_saved_bytes(benchmark, mode):
    config = case_config(SMOKE_CONFIGS[0], mode, "fp32", "sdpa")
    assert benchmark(measure_saved_bytes, config) > 0
