"""Exact gradient accumulation and per-sample randomness: k micro-batches of b equal one batch of k*b (fp32, same
samples and noise); clip / optimizer step / LR schedule / EMA / step counter once per optimizer step; the DDP
no_sync hook skips all but the last micro-batch; classifier-free-guidance dropout is per sample and at its rate."""
import json

import pytest
import torch
from safetensors.torch import load_file

from ristretto.engine import train as train_module
from ristretto.engine.config import build_config
from ristretto.engine.train import (Encoders, caption_dropout_mask, draw_timesteps_and_noise, drop_conditions,
                                    lr_factor, sync_context, train)

TINY = ["model.hidden_size=32", "model.num_heads=2", "model.depth=1", "data.frames=2", "data.resolution=8",
        "diffusion.sample_steps=1", "sample.num_samples=1", "train.log_every=1", "train.warmup_steps=2",
        "train.lr_schedule=cosine", "train.max_steps=3", "train.lr=1e-2", "train.grad_clip=0.05",
        "train.cfg_dropout=0.3"]


def run(tmp_path, name, batch_size, grad_accum, monkeypatch=None, calls=None):
    config = build_config("tiny-t2v", TINY + [f"train.batch_size={batch_size}", f"train.grad_accum={grad_accum}"])
    if calls is not None:
        def recording_sync_context(model, is_last_micro):
            calls.append(is_last_micro)
            return sync_context(model, is_last_micro)
        monkeypatch.setattr(train_module, "sync_context", recording_sync_context)
    state = train(config, tmp_path / name)
    metrics = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    weights = load_file(str(tmp_path / name / "weights" / "model.safetensors"))
    ema = load_file(str(tmp_path / name / "weights" / "ema.safetensors"))
    return state, metrics, weights, ema


def test_accumulated_micro_batches_equal_one_big_batch(tmp_path, monkeypatch):
    calls = []
    state_acc, metrics_acc, weights_acc, ema_acc = run(tmp_path, "accum", 2, 4, monkeypatch, calls)
    monkeypatch.undo()
    state_big, metrics_big, weights_big, ema_big = run(tmp_path, "big", 8, 1)

    # Once per optimizer step: the step counter, the schedule, the logged lines.
    assert state_acc.step == state_big.step == 3
    assert state_acc.samples_seen == state_big.samples_seen == 24
    assert [m["step"] for m in metrics_acc] == [1, 2, 3]
    # The LR each step used follows warmup then cosine, stepped once per optimizer step (not per micro-batch).
    train_cfg = build_config("tiny-t2v", TINY).train
    expected_lr = [1e-2 * lr_factor(step, train_cfg) for step in range(3)]
    assert [m["lr"] for m in metrics_acc] == pytest.approx(expected_lr, rel=1e-12)
    assert [m["lr"] for m in metrics_big] == pytest.approx(expected_lr, rel=1e-12)
    # The same samples, noise, timesteps and dropout: equal losses and gradient norms (before clipping).
    assert [m["loss"] for m in metrics_acc] == pytest.approx([m["loss"] for m in metrics_big], rel=1e-5)
    assert [m["grad_norm"] for m in metrics_acc] == pytest.approx([m["grad_norm"] for m in metrics_big], rel=1e-4)
    assert all(m["grad_norm"] > 0.05 for m in metrics_big)  # clipping was active in every step
    # The same parameters and EMA after 3 optimizer steps.
    assert weights_acc.keys() == weights_big.keys()
    moved = 0
    # atol 1e-5 against lr 1e-2 steps: parameters whose true gradient is zero (attention key biases) receive fp32
    # summation noise that Adam normalises, so they differ by ~2e-6; stepping per micro-batch would differ by ~1e-2.
    for key in weights_big:
        torch.testing.assert_close(weights_acc[key], weights_big[key], rtol=1e-5, atol=1e-5, msg=key)
        torch.testing.assert_close(ema_acc[key], ema_big[key], rtol=1e-5, atol=1e-5, msg=key)
        moved += int(not torch.equal(weights_big[key], ema_big[key]))
    assert moved > 0
    # DDP hook: gradient sync skipped on the first k-1 micro-batches of every optimizer step, done on the last.
    assert calls == [False, False, False, True] * 3


def test_lr_schedule_warmup_then_constant_or_cosine():
    config = build_config("tiny-t2v", ["train.warmup_steps=4", "train.max_steps=14"]).train
    assert [lr_factor(s, config) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    config.lr_schedule = "cosine"
    assert lr_factor(4, config) == 1.0
    assert lr_factor(9, config) == pytest.approx(0.5)
    assert lr_factor(14, config) == pytest.approx(0.0, abs=1e-12)


def test_per_sample_randomness_does_not_depend_on_the_split():
    timesteps, noise = draw_timesteps_and_noise((8, 2, 3, 4, 4), first_index=16, seed=3, num_timesteps=1000)
    for first in range(16, 24, 2):
        part_t, part_n = draw_timesteps_and_noise((2, 2, 3, 4, 4), first_index=first, seed=3, num_timesteps=1000)
        assert torch.equal(part_t, timesteps[first - 16:first - 14])
        assert torch.equal(part_n, noise[first - 16:first - 14])
    other_t, other_n = draw_timesteps_and_noise((8, 2, 3, 4, 4), first_index=16, seed=4, num_timesteps=1000)
    assert not torch.equal(other_n, noise)


def test_caption_dropout_rate_and_per_sample_choice():
    drop = caption_dropout_mask(20_000, first_index=0, seed=0, probability=0.1)
    assert drop.dtype == torch.bool
    assert abs(drop.float().mean().item() - 0.1) < 0.01  # binomial std 0.002
    # Sample i's choice is its own: the same in any micro-batch split, different from its neighbours'.
    assert torch.equal(caption_dropout_mask(7, first_index=100, seed=0, probability=0.1), drop[100:107])
    assert not caption_dropout_mask(64, first_index=0, seed=0, probability=0.0).any()
    assert 0 < drop[:200].sum() < 200


def test_drop_conditions_replaces_exactly_the_dropped_samples():
    config = build_config("tiny-t2v", [])
    null = (torch.full((5, 3), -1.0), torch.tensor([True, False, False, False, False]))
    encoders = Encoders(vae=None, text_encoder=None, null_caption=null)
    caption = torch.randn(4, 5, 3)
    mask = torch.ones(4, 5, dtype=torch.bool)
    drop = torch.tensor([False, True, False, True])
    out = drop_conditions({"caption": caption, "caption_mask": mask}, drop, encoders, config)
    for row in range(4):
        expected = (null[0], null[1]) if drop[row] else (caption[row], mask[row])
        assert torch.equal(out["caption"][row], expected[0]) and torch.equal(out["caption_mask"][row], expected[1])

    class_config = build_config("tiny-class", [])
    labels = torch.tensor([0, 1, 2, 3])
    out = drop_conditions({"label": labels}, drop, encoders, class_config)
    assert out["label"].tolist() == [0, class_config.model.num_classes, 2, class_config.model.num_classes]
