"""The proof that training works: the `synthetic-proof` preset, trained on CPU, draws held-out caption combinations
(colour x direction pairs never seen in training) in the right colour and moving the right way.

Slow (about 4-5 CPU-minutes of training plus sampling): excluded from the default run; select with `pytest -m slow`.
The issue's bar: >= 90% colour and >= 80% direction accuracy on held-out combinations, in <= 30 minutes on 2 cores.
"""
import json
import time

import pytest
import torch

from ristretto.bench.quality import evaluate_run
from ristretto.engine.config import build_config
from ristretto.engine.train import train


@pytest.mark.slow
def test_synthetic_proof_preset_reaches_the_bar(tmp_path):
    torch.set_num_threads(2)
    config = build_config("synthetic-proof", ["train.device=cpu"])
    start = time.perf_counter()
    train(config, tmp_path / "run")
    train_s = time.perf_counter() - start
    result = evaluate_run(tmp_path / "run", seeds=4, split="heldout")
    print(json.dumps({"train_s": train_s, **result}))
    assert train_s < 30 * 60
    assert result["n"] == 48
    assert result["colour_accuracy"] >= 0.9, result
    assert result["direction_accuracy"] >= 0.8, result
