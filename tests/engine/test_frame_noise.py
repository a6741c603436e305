"""diffusion.frame_noise_correlation (PYoCo's mixed noise): frames share part of their noise, in training and sampling."""
import pytest
import torch

from ristretto.engine.diffusion import mix_frame_noise
from ristretto.engine.train import draw_timesteps_and_noise


def frame_correlation(noise: torch.Tensor) -> float:
    flat = noise.flatten(2)  # [B, F, N]
    return torch.corrcoef(torch.stack([flat[:, 0].flatten(), flat[:, 1].flatten()]))[0, 1].item()


def test_mixed_noise_keeps_unit_variance_and_has_the_asked_correlation():
    generator = torch.Generator().manual_seed(0)
    noise, shared = torch.randn(64, 4, 3, 16, 16, generator=generator), torch.randn(64, 3, 16, 16, generator=generator)
    mixed = mix_frame_noise(noise, shared, 0.5)
    assert mixed.std().item() == pytest.approx(1.0, abs=0.02)
    assert frame_correlation(mixed) == pytest.approx(0.5, abs=0.03)
    assert frame_correlation(noise) == pytest.approx(0.0, abs=0.03)
    assert mix_frame_noise(noise, shared, 0.0) is noise


def test_correlation_outside_the_unit_interval_is_named():
    with pytest.raises(ValueError, match="frame_noise_correlation"):
        mix_frame_noise(torch.zeros(1, 2, 3), torch.zeros(1, 3), 1.0)


def test_training_draws_are_unchanged_without_correlation_and_correlated_with_it():
    shape = (32, 4, 3, 8, 8)
    timesteps, independent = draw_timesteps_and_noise(shape, 0, 0, 1000, 0.5)
    timesteps_mixed, mixed = draw_timesteps_and_noise(shape, 0, 0, 1000, 0.5, frame_noise_correlation=0.5)
    assert torch.equal(timesteps, timesteps_mixed)  # the shared draw comes after the others
    assert frame_correlation(independent) == pytest.approx(0.0, abs=0.06)
    assert frame_correlation(mixed) == pytest.approx(0.5, abs=0.06)
