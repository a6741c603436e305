"""The Latte family at tiny size: output shapes for every preset's structure, joint image+video isolation, seams."""
import pytest
import torch

from ristretto.engine.build import apply_attention_backend, build_plain_model, latent_geometry
from ristretto.engine.config import PRESETS, build_config
from ristretto.model.latte import latte_from_config

TINY = ["model.hidden_size=32", "model.depth=1", "model.num_heads=2", "data.frames=3", "data.resolution=16",
        "model.caption_channels=12", "model.caption_length=6"]


def tiny_config(preset):
    config = build_config(preset, TINY)
    if config.model.vae != "identity":  # presets with the SD VAE: tiny latents of 16 px = 128 px frames
        config.data.resolution = 128
    return config


def conditions_for(config, batch, generator):
    if config.model.kind == "class":
        return {"label": torch.randint(0, config.model.num_classes + 1, (batch,), generator=generator)}
    return {"caption": torch.randn(batch, 6, 12, generator=generator),
            "caption_mask": torch.tensor([[1, 1, 1, 1, 0, 0]] * batch, dtype=torch.bool)}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_structure_runs_forward_and_backward(preset):
    config = tiny_config(preset)
    generator = torch.Generator().manual_seed(0)
    model = build_plain_model(config)
    channels, size = latent_geometry(config)
    x = torch.randn(2, config.data.frames, channels, size, size, generator=generator)
    out = model(x, torch.tensor([0, 999]), **conditions_for(config, 2, generator))
    expected_channels = channels * (2 if config.model.learn_sigma else 1)
    assert out.shape == (2, config.data.frames, expected_channels, size, size)
    out.square().mean().backward()
    assert model.patch_embed.weight.grad is not None and torch.isfinite(model.patch_embed.weight.grad).all()


def test_depth_counts_spatial_temporal_pairs():
    config = build_config("latte-t2v-512", ["model.hidden_size=32", "model.num_heads=2", "model.depth=3"])
    model = latte_from_config(config.model, 2, 8)
    assert len(model.blocks) == 6
    assert [block.cross_attn is not None for block in model.blocks] == [True, False] * 3


def joint_model_and_inputs(seed=0):
    config = build_config("tiny-t2v", TINY)
    torch.manual_seed(seed)
    model = build_plain_model(config).eval()
    with torch.no_grad():  # zero-initialised output layers would hide any leak: randomise everything
        for param in model.parameters():
            param.normal_(0, 0.2)
    generator = torch.Generator().manual_seed(seed)
    video = torch.randn(2, 3 + 2, 3, 16, 16, generator=generator)  # 3 video frames + 2 images
    conditions = conditions_for(config, 2, generator)
    conditions["image_caption"] = torch.randn(2, 2, 6, 12, generator=generator)
    conditions["image_caption_mask"] = torch.ones(2, 2, 6, dtype=torch.bool)
    return model, video, conditions


def test_image_frames_do_not_reach_video_frames():
    model, video, conditions = joint_model_and_inputs()
    timestep = torch.tensor([10, 500])
    with torch.no_grad():
        before = model(video, timestep, num_images=2, **conditions)
        changed = video.clone()
        changed[:, 3:] = torch.randn_like(changed[:, 3:])
        other_captions = dict(conditions, image_caption=torch.randn_like(conditions["image_caption"]))
        after = model(changed, timestep, num_images=2, **other_captions)
        video_only = model(video[:, :3], timestep, **{k: conditions[k] for k in ("caption", "caption_mask")})
    assert (after[:, 3:] - before[:, 3:]).abs().max() > 1e-3  # the images' own outputs did change
    torch.testing.assert_close(after[:, :3], before[:, :3], atol=1e-6, rtol=0)
    torch.testing.assert_close(before[:, :3], video_only, atol=1e-5, rtol=0)


def test_images_skip_temporal_attention():
    """An image frame's output does not depend on the video frames (they meet only in temporal attention)."""
    model, video, conditions = joint_model_and_inputs(seed=1)
    timestep = torch.tensor([10, 500])
    with torch.no_grad():
        joint = model(video, timestep, num_images=2, **conditions)
        moved = video.clone()
        moved[:, :3] = torch.randn_like(moved[:, :3])
        joint_other_video = model(moved, timestep, num_images=2, **conditions)
    torch.testing.assert_close(joint[:, 3:], joint_other_video[:, 3:], atol=1e-6, rtol=0)


def test_attention_backend_seam_is_applied_from_outside():
    config = build_config("tiny-t2v", TINY)
    model = build_plain_model(config)
    calls = []

    def recording_attention(q, k, v, mask=None):
        calls.append(q.shape)
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=None if mask is None else mask[:, None, None, :]).transpose(1, 2)

    import ristretto.kernels.attention as attention_module
    attention_module.ATTENTION_BACKENDS["recording"] = lambda: recording_attention  # registry holds factories
    try:
        apply_attention_backend(model, "recording")
        model(torch.randn(1, 3, 3, 16, 16), torch.tensor([5]), caption=torch.randn(1, 6, 12))
    finally:
        del attention_module.ATTENTION_BACKENDS["recording"]
    # one layer: spatial self (B*F=3 rows of 16 tokens), cross (the sample's 3 frames as one row of 48 queries
    # against its caption), temporal self (16 positions of 3 frames, through the attention_backend path)
    assert calls == [(3, 16, 2, 16), (1, 48, 2, 16), (16, 3, 2, 16)]



def test_caption_adaln_starts_silent_then_conditions_every_block():
    plain_config = build_config("tiny-t2v", TINY)
    config = build_config("tiny-t2v", TINY + ["model.caption_adaln=true"])
    torch.manual_seed(0)
    plain = build_plain_model(plain_config).eval()
    with torch.no_grad():
        for param in plain.parameters():
            param.normal_(0, 0.2)
    model = build_plain_model(config).eval()
    missing = model.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(key.endswith(("modulation.caption.weight", "modulation.caption.bias")) for key in missing)
    generator = torch.Generator().manual_seed(2)
    video, timestep = torch.randn(2, 3, 3, 16, 16, generator=generator), torch.tensor([10, 900])
    conditions = conditions_for(config, 2, generator)
    with torch.no_grad():
        torch.testing.assert_close(model(video, timestep, **conditions), plain(video, timestep, **conditions))
        model.blocks[1].modulation.caption.weight.normal_(0, 0.2)  # a temporal block now reads the caption itself
        other = dict(conditions, caption=torch.randn(2, 6, 12, generator=generator))
        changed = (model(video, timestep, **other) - plain(video, timestep, **other)).abs().max()
    assert changed > 1e-3
