"""EMA: decay and warmup as configured, updated once per optimizer step with the weights after that step; validation
samples (during and at the end of training) and the exported weights come from the EMA, not the live model."""
import pytest
import torch
from safetensors.torch import load_file

from ristretto.engine import train as train_module
from ristretto.engine.config import build_config
from ristretto.engine.ema import EMA

TINY = ["model.hidden_size=32", "model.num_heads=2", "model.depth=1", "data.frames=2", "data.resolution=8",
        "train.batch_size=2", "train.max_steps=3", "train.warmup_steps=1", "train.lr=1e-2",
        "diffusion.sample_steps=1", "sample.num_samples=1"]


def test_decay_schedule_and_update_rule():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.99, warmup=True)
    assert [ema.decay_at(s) for s in (0, 1, 10)] == pytest.approx([0.1, 2 / 11, 11 / 20])
    assert ema.decay_at(10_000) == 0.99
    assert EMA(model, decay=0.9, warmup=False).decay_at(0) == 0.9
    start = ema.model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=0)  # decay 0.1: 0.1 * old + 0.9 * new
    torch.testing.assert_close(ema.model.weight, 0.1 * start + 0.9 * model.weight.detach())
    assert not ema.model.weight.requires_grad and not ema.model.training


def test_training_updates_ema_once_per_step_and_samples_from_it(tmp_path, monkeypatch):
    built, updates, sampled_with = {}, [], []
    real_build, real_update, real_sample = (train_module.build_training_model, EMA.update,
                                            train_module.sample_videos)

    def spy_build(config, device, **kwargs):
        model, ema, precision = real_build(config, device, **kwargs)
        built.update(model=model, ema=ema, start={k: v.clone() for k, v in ema.state_dict().items()})
        return model, ema, precision

    def spy_update(self, model, step):
        updates.append((step, self.decay_at(step), {k: v.detach().clone() for k, v in model.state_dict().items()}))
        real_update(self, model, step)

    def spy_sample(config, model, *args, **kwargs):
        sampled_with.append(model)
        return real_sample(config, model, *args, **kwargs)

    monkeypatch.setattr(train_module, "build_training_model", spy_build)
    monkeypatch.setattr(EMA, "update", spy_update)
    monkeypatch.setattr(train_module, "sample_videos", spy_sample)
    config = build_config("tiny-t2v", TINY + ["train.ema_decay=0.8", "train.ema_warmup=false", "train.sample_every=2",
                                              "train.grad_accum=2"])
    train_module.train(config, tmp_path / "run")

    # Once per optimizer step (not per micro-batch), with the configured decay, on the weights after the step.
    assert [(step, decay) for step, decay, _ in updates] == [(0, 0.8), (1, 0.8), (2, 0.8)]
    expected = built["start"]
    for _, decay, weights in updates:
        expected = {k: decay * expected[k] + (1 - decay) * weights[k] for k in expected}
    saved_ema = load_file(str(tmp_path / "run" / "weights" / "ema.safetensors"))
    saved_model = load_file(str(tmp_path / "run" / "weights" / "model.safetensors"))
    for key in expected:
        torch.testing.assert_close(saved_ema[key], expected[key], rtol=1e-6, atol=1e-7, msg=key)
    assert any(not torch.equal(saved_ema[k], saved_model[k]) for k in saved_model)
    # Validation at step 2 and at the end, both from the EMA model.
    assert len(sampled_with) == 2 and all(m is built["ema"].model for m in sampled_with)
    assert (tmp_path / "run" / "samples" / "step_2").is_dir() and (tmp_path / "run" / "samples" / "step_3").is_dir()
    assert built["model"].training  # sampling put the EMA in eval, never the training model


def test_without_ema_samples_use_the_live_model(tmp_path, monkeypatch):
    sampled_with, built = [], {}
    real_build, real_sample = train_module.build_training_model, train_module.sample_videos

    def spy_build(config, device, **kwargs):
        built["model"], ema, precision = real_build(config, device, **kwargs)
        assert ema is None
        return built["model"], ema, precision

    def spy_sample(config, model, *args, **kwargs):
        sampled_with.append(model)
        return real_sample(config, model, *args, **kwargs)

    monkeypatch.setattr(train_module, "build_training_model", spy_build)
    monkeypatch.setattr(train_module, "sample_videos", spy_sample)
    train_module.train(build_config("tiny-t2v", TINY + ["train.ema_decay=0", "train.max_steps=1"]), tmp_path / "run")
    assert sampled_with == [built["model"]]
    assert not (tmp_path / "run" / "weights" / "ema.safetensors").exists()


def two_layer_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.GELU(), torch.nn.Linear(3, 2))


def nudge(model, amount):
    with torch.no_grad():
        for param in model.parameters():
            param.add_(amount * torch.randn_like(param))


def test_multi_tensor_update_equals_the_per_parameter_rule():
    model = two_layer_model()
    ema = EMA(model, decay=0.9, warmup=False)
    expected = {k: v.clone() for k, v in ema.state_dict().items()}
    for step in range(3):
        nudge(model, 0.5)
        ema.update(model, step)
        expected = {k: 0.9 * expected[k] + 0.1 * v.detach() for k, v in model.state_dict().items()}
    for key, value in ema.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-7, msg=key)


def test_ema_every_k_updates_every_kth_step_with_decay_to_the_k():
    model = two_layer_model()
    ema = EMA(model, decay=0.9, warmup=False, every=3)
    expected = {k: v.clone() for k, v in ema.state_dict().items()}
    for step in range(7):
        nudge(model, 0.5)
        before = {k: v.clone() for k, v in ema.state_dict().items()}
        ema.update(model, step)
        if step in (2, 5):  # the 3rd and 6th optimizer steps
            expected = {k: 0.9**3 * expected[k] + (1 - 0.9**3) * v.detach() for k, v in model.state_dict().items()}
        else:
            assert all(torch.equal(v, before[k]) for k, v in ema.state_dict().items()), step
    for key, value in ema.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-7, msg=key)
    with pytest.raises(ValueError, match="ema_every"):
        EMA(model, decay=0.9, every=0)


def test_ema_options_reach_the_built_ema_and_are_validated():
    from ristretto.engine.build import build_training_model
    from ristretto.engine.config import ConfigError

    config = build_config("tiny-t2v", TINY + ["train.ema_every=4", "train.ema_on_cpu=true"])
    _, ema, _ = build_training_model(config, torch.device("cpu"))
    assert ema.every == 4 and all(p.device.type == "cpu" for p in ema.model.parameters())
    with pytest.raises(ConfigError, match="train.ema_every"):
        build_config("tiny-t2v", ["train.ema_every=0"])
    with pytest.raises(ConfigError, match="train.ema_on_cpu"):
        build_config("tiny-t2v", ["train.ema_on_cpu=true", "dist.strategy=fsdp"])


@pytest.mark.gpu
def test_ema_on_cpu_follows_a_cuda_model():
    model = two_layer_model().cuda()
    ema = EMA(model, decay=0.5, warmup=False, device="cpu")
    assert all(p.device.type == "cpu" for p in ema.model.parameters())
    start = {k: v.clone() for k, v in ema.state_dict().items()}
    nudge(model, 1.0)
    ema.update(model, 0)
    for key, value in ema.state_dict().items():
        torch.testing.assert_close(value, 0.5 * start[key] + 0.5 * model.state_dict()[key].cpu(), msg=key)
