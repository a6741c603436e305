"""Our text-to-video Latte is numerically diffusers' LatteTransformer3DModel (the reference implementation)."""
import pytest
import torch

from ristretto.engine.config import ModelConfig
from ristretto.model.diffusers_interop import (diffusers_config, from_diffusers, model_fields_from_diffusers,
                                               to_diffusers)
from ristretto.model.latte import latte_from_config

diffusers = pytest.importorskip("diffusers")

FRAMES, SAMPLE = 3, 8


def tiny_pair(seed=0, learn_sigma=True):
    torch.manual_seed(seed)
    cfg = ModelConfig(in_channels=4, learn_sigma=learn_sigma, patch_size=2, hidden_size=16, depth=2, num_heads=2,
                      caption_channels=12, caption_length=5)
    reference = diffusers.LatteTransformer3DModel(**diffusers_config(cfg, FRAMES, SAMPLE)).eval()
    with torch.no_grad():  # diffusers zero-inits nothing we could hide behind: randomise every weight
        for param in reference.parameters():
            param.normal_(0, 0.1)
    ours = latte_from_config(cfg, FRAMES, SAMPLE).eval()
    ours.load_state_dict(from_diffusers(reference.state_dict()))
    return cfg, ours, reference


def inputs(batch=2, seed=1):
    generator = torch.Generator().manual_seed(seed)
    video = torch.randn(batch, FRAMES, 4, SAMPLE, SAMPLE, generator=generator)  # ours: (B, F, C, H, W)
    timestep = torch.tensor([10, 900][:batch])
    caption = torch.randn(batch, 5, 12, generator=generator)
    return video, timestep, caption


def diffusers_bias(mask: torch.Tensor, frames: int) -> torch.Tensor:
    """diffusers 0.42 hands encoder_attention_mask to the spatial blocks unchanged: give it the additive bias it
    adds to the scores, one row per frame ([B*F, 1, L])."""
    bias = (1.0 - mask.float()) * -10000.0
    return bias.repeat_interleave(frames, dim=0)[:, None, :]


def run_reference(reference, video, timestep, caption, bias=None):
    out = reference(video.permute(0, 2, 1, 3, 4), timestep, encoder_hidden_states=caption,
                    encoder_attention_mask=bias).sample
    return out.permute(0, 2, 1, 3, 4)


def test_output_equals_diffusers_without_mask():
    _, ours, reference = tiny_pair()
    video, timestep, caption = inputs()
    with torch.no_grad():
        expected = run_reference(reference, video, timestep, caption)
        got = ours(video, timestep, caption=caption)
    assert got.shape == (2, FRAMES, 8, SAMPLE, SAMPLE)
    assert expected.abs().max() > 0.1  # a real signal, not zeros
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_output_equals_diffusers_with_padding_mask():
    _, ours, reference = tiny_pair(seed=3)
    video, timestep, caption = inputs()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        expected = run_reference(reference, video, timestep, caption, diffusers_bias(mask, FRAMES))
        got = ours(video, timestep, caption=caption, caption_mask=mask)
        trimmed = ours(video[:1], timestep[:1], caption=caption[:1, :3])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(got[:1], trimmed, atol=1e-5, rtol=0)  # padding is invisible


def test_export_round_trip_and_config():
    cfg, ours, reference = tiny_pair(seed=5, learn_sigma=False)
    exported = to_diffusers(ours.state_dict())
    assert exported.keys() == reference.state_dict().keys()
    for key, tensor in reference.state_dict().items():
        torch.testing.assert_close(exported[key], tensor, atol=0, rtol=0)
    again = diffusers.LatteTransformer3DModel(**diffusers_config(cfg, FRAMES, SAMPLE)).eval()
    again.load_state_dict(exported)
    video, timestep, caption = inputs()
    with torch.no_grad():
        torch.testing.assert_close(run_reference(again, video, timestep, caption), ours(video, timestep, caption=caption),
                                   atol=1e-5, rtol=0)
    fields = model_fields_from_diffusers(dict(reference.config))
    assert fields["hidden_size"] == 16 and fields["depth"] == 2 and fields["learn_sigma"] is False


def test_unsupported_diffusers_config_is_named():
    with pytest.raises(ValueError, match="norm_type"):
        model_fields_from_diffusers({"norm_type": "layer_norm"})
