"""The diffusion process: targets, loss weights, and the learned-sigma variational-bound term."""
import pytest
import torch

from ristretto.engine.config import DiffusionConfig
from ristretto.engine.diffusion import Diffusion


def batch(seed=0, shape=(3, 2, 4, 4, 4)):
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.rand(shape, generator=generator) * 2 - 1
    noise = torch.randn(shape, generator=generator)
    return x0, noise


def test_vb_term_is_zero_for_the_true_mean_and_posterior_variance():
    diffusion = Diffusion(DiffusionConfig())
    x0, noise = batch()
    timesteps = torch.tensor([1, 400, 999])
    x_t = diffusion.add_noise(x0, noise, timesteps)
    # The true epsilon gives the true posterior mean; variance value -1 selects the posterior variance (lower end).
    vb = diffusion.variational_bound(noise, -torch.ones_like(noise), x0, x_t, timesteps)
    assert vb.abs().max() < 1e-4
    wrong = diffusion.variational_bound(noise, torch.ones_like(noise), x0, x_t, timesteps)
    # The other end of the learned range costs bits, most at small t where beta and the posterior variance differ.
    assert (wrong > 0).all() and wrong[0] > 1e-2


def test_vb_term_at_t0_is_the_decoder_nll_and_trains_only_the_variance():
    diffusion = Diffusion(DiffusionConfig())
    x0, noise = batch(1)
    timesteps = torch.zeros(3, dtype=torch.long)
    x_t = diffusion.add_noise(x0, noise, timesteps)
    output = torch.cat([noise + 0.1, torch.zeros_like(noise)], dim=2).requires_grad_(True)
    loss = diffusion.training_loss(output, x0, noise, x_t, timesteps)
    assert (loss > 0).all()
    grad_mean, grad_var = torch.autograd.grad(loss.sum(), output)[0].split(4, dim=2)
    # The mean channels get only the MSE gradient 2 * 0.1 / (elements per sample): the VB term sees a frozen mean.
    torch.testing.assert_close(grad_mean, torch.full_like(grad_mean, 0.2 / noise[0].numel()))
    assert grad_var.abs().max() > 0


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_target_matches_diffusers_definition(prediction):
    diffusion = Diffusion(DiffusionConfig(prediction=prediction))
    x0, noise = batch(2)
    timesteps = torch.tensor([0, 500, 999])
    target = diffusion.target(x0, noise, timesteps)
    if prediction == "epsilon":
        assert torch.equal(target, noise)
    else:
        alpha = diffusion.alphas_cumprod[timesteps].float().view(-1, 1, 1, 1, 1)
        torch.testing.assert_close(target, alpha.sqrt() * noise - (1 - alpha).sqrt() * x0)


def test_min_snr_weights_clip_low_noise_steps():
    eps = Diffusion(DiffusionConfig(loss_weighting="min_snr"))
    timesteps = torch.tensor([0, 999])
    weights = eps.loss_weights(timesteps)
    assert weights[0] < 0.01 and weights[1] == pytest.approx(1.0)  # high SNR down-weighted, low SNR kept
    assert torch.equal(Diffusion(DiffusionConfig()).loss_weights(timesteps), torch.ones(2))


def test_zero_terminal_snr_samples_from_the_last_timestep():
    diffusion = Diffusion(DiffusionConfig(schedule="squaredcos_cap_v2", rescale_zero_snr=True,
                                          prediction="v_prediction"))
    assert diffusion.alphas_cumprod[-1] < 1e-6
    sampler = diffusion.sampler()
    sampler.set_timesteps(10)
    assert int(sampler.timesteps[0]) == 999


def test_high_noise_bias_moves_that_fraction_of_timesteps_into_the_noisiest_30_percent():
    from ristretto.engine.train import draw_timesteps_and_noise

    shape = (4000, 1, 1, 2, 2)
    uniform, noise = draw_timesteps_and_noise(shape, 0, seed=5, num_timesteps=1000)
    biased, biased_noise = draw_timesteps_and_noise(shape, 0, seed=5, num_timesteps=1000, high_noise_bias=0.5)
    assert torch.equal(noise, biased_noise)  # the bias never changes a sample's noise
    moved = biased != uniform
    assert (biased[moved] >= 700).all() and (biased < 1000).all()
    high = (biased >= 700).float().mean().item()
    assert high == pytest.approx(0.3 + 0.5 * 0.7, abs=0.03)  # uniform's own 30% plus half of the rest
    assert (uniform >= 700).float().mean().item() == pytest.approx(0.3, abs=0.03)


def test_schedule_tables_are_copied_to_a_device_once(monkeypatch):
    """training_loss indexes fp64 tables by the timesteps on their device: each table is moved there once, not in
    every step (a copy per step would cross PCIe and make the host wait)."""
    diffusion = Diffusion(DiffusionConfig())
    moved = []
    real_table = Diffusion.table

    def counting(self, name, device):
        tables = self._tables_on.get(torch.device(device), {})
        if name not in tables:
            moved.append(name)
        return real_table(self, name, device)

    monkeypatch.setattr(Diffusion, "table", counting)
    x0, noise = torch.randn(2, 2, 3, 4, 4), torch.randn(2, 2, 3, 4, 4)
    timesteps = torch.tensor([0, 500])
    output = torch.randn(2, 2, 6, 4, 4)  # learned sigma: the variational-bound term reads five tables
    for _ in range(3):
        diffusion.training_loss(output, x0, noise, diffusion.add_noise(x0, noise, timesteps), timesteps)
    assert sorted(moved) == sorted(set(moved)) and len(moved) >= 4
    assert diffusion.table("log_betas", "cpu") is diffusion.table("log_betas", torch.device("cpu"))
    torch.testing.assert_close(diffusion.table("log_betas", "cpu"), diffusion.betas.log())
