"""bench/fp8_sensitivity.py: per-group gradient error of emulated FP8, on a tiny synthetic model."""
import pytest
import torch

from ristretto.engine.build import build_plain_model
from ristretto.engine.config import build_config

TINY = ["model.hidden_size=32", "model.num_heads=2", "model.depth=1", "data.frames=2", "train.batch_size=2"]


def test_sensitivity_rows_name_each_group_and_fp8_adds_error():
    pytest.importorskip("torchao.float8")
    from ristretto.bench.fp8_sensitivity import sensitivity

    config = build_config("synthetic-proof", TINY)
    torch.manual_seed(0)
    rows = {row["group"]: row for row in sensitivity(config, build_plain_model(config).state_dict(), batches=1)}
    everything = rows["FP8 all block linears"]
    assert everything["linears"] == 11  # depth 1: a spatial block (7, with cross-attention) + a temporal (4)
    assert rows["FP8 cross_attn.kv only"]["linears"] == 1 and rows["FP8 mlp.fc1 only"]["linears"] == 2
    assert rows["FP8 spatial blocks only"]["linears"] + rows["FP8 temporal blocks only"]["linears"] == 11
    assert 0 < rows["fp32 (no autocast), for scale"]["grad_error"] < 0.1
    assert rows["FP8 first + last block only"]["linears"] == 11 and rows["FP8 all but first + last block"]["linears"] == 0
    # fresh adaLN-Zero weights: the gates are zero, so only linears feeding the gates' gradients see an FP8 error
    assert everything["grad_error"] > 0 and rows["FP8 mlp.fc1 only"]["grad_error"] > 0


def test_the_command_prints_the_table_and_writes_json(tmp_path, capsys):
    pytest.importorskip("torchao.float8")
    import json

    from ristretto.bench.fp8_sensitivity import main

    assert main(["--batches", "1", "--out", str(tmp_path), *[a for item in TINY for a in ("--set", item)]]) == 0
    (path,) = tmp_path.glob("fp8_sensitivity_*.json")
    saved = json.loads(path.read_text())
    assert saved["environment"]["torch"] and saved["recipe"] == "tensorwise"
    assert [row["group"] for row in saved["rows"]][:2] == ["fp32 (no autocast), for scale", "FP8 all block linears"]
    assert "grad_error" in capsys.readouterr().out
