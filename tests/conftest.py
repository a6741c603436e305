"""Shared test setup: Triton runs in interpreter mode on CPU; `gpu` tests skip without CUDA."""
import os

import torch

# Triton reads this when kernels are launched: without a GPU, run the kernels in the interpreter on CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# One thread: the tests' tensors are tiny (thread overhead dominates), and OpenMP threads that spin-wait for a busy
# core make a shared CI machine 10-50x slower. Subprocesses (train.py, torchrun) inherit it through the environment.
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    """The device kernel tests run on: CUDA when present, else CPU (Triton interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
