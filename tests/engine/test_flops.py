"""The analytic FLOP counter equals torch's FlopCounterMode on real tiny models (sdpa-math: its bmm are counted)."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ristretto.bench.step import cpu_threads
from ristretto.engine.build import build_plain_model, latent_geometry
from ristretto.engine.config import build_config
from ristretto.engine.flops import model_flops, recompute_flops

CASES = {
    "t2v": ("tiny-t2v", []),
    "class+sigma": ("tiny-class", ["model.learn_sigma=true"]),
    "t2v+images+pool": ("tiny-t2v", ["data.num_images=2", "model.pooled_caption=true", "data.frames=4"]),
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is faster than two, and immune to other processes on shared cores."""
    with cpu_threads(1):
        yield


def model_inputs(config, batch: int):
    generator = torch.Generator().manual_seed(0)
    channels, size = latent_geometry(config)
    frames = config.data.frames + config.data.num_images
    x = torch.randn(batch, frames, channels, size, size, generator=generator)
    if config.model.kind == "class":
        return x, {"label": torch.arange(batch) % config.model.num_classes}
    length, width = config.model.caption_length, config.model.caption_channels
    conditions = {"caption": torch.randn(batch, length, width, generator=generator),
                  "caption_mask": torch.arange(length)[None].expand(batch, -1) < length - 3}
    if config.data.num_images:
        conditions["image_caption"] = torch.randn(batch, config.data.num_images, length, width, generator=generator)
    return x, conditions


@pytest.mark.parametrize("case", list(CASES))
def test_counts_equal_flop_counter_mode(case):
    preset, overrides = CASES[case]
    config = build_config(preset, ["model.attention_backend=sdpa-math", "train.batch_size=2", *overrides])
    torch.manual_seed(0)
    model = build_plain_model(config)
    x, conditions = model_inputs(config, 2)
    timesteps = torch.tensor([3, 700])
    with FlopCounterMode(display=False) as forward_counter:
        model(x, timesteps, num_images=config.data.num_images, **conditions)
    with FlopCounterMode(display=False) as training_counter:
        model(x, timesteps, num_images=config.data.num_images, **conditions).square().mean().backward()
    count = model_flops(config)
    assert count.forward == pytest.approx(forward_counter.get_total_flops(), rel=1e-6)
    # 3x forward is the model-FLOPs convention; torch skips the input gradients of the first linears (< 1% here).
    assert count.training == pytest.approx(training_counter.get_total_flops(), rel=0.02)


def test_parts_scale_and_recompute():
    config = build_config("latte-xl2-ucf")
    count = model_flops(config)
    assert model_flops(config, batch=8).forward == pytest.approx(2 * count.forward)  # preset batch is 4
    blocks = sum(flops for name, flops in count.parts.items() if name.startswith(("spatial.", "temporal.")))
    assert recompute_flops(config, "none") == 0
    assert recompute_flops(config, "full") == pytest.approx(blocks)
    assert recompute_flops(config, "every-k") < recompute_flops(config, "full")
    assert 0 < recompute_flops(config, "selective-attention") < recompute_flops(config, "selective-mlp") < blocks
    # DiT-XL/2 is 118.6 G multiply-adds per 256^2 image (28 blocks); Latte-XL/2 has 28 blocks too, over 16 frames,
    # plus temporal attention: about 16 * 2 * 118.6 GFLOPs = 3.8 TFLOPs forward per sample.
    assert 3.4e12 < count.forward / 4 < 4.0e12
