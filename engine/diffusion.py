"""The diffusion process around the model: noise schedule, training targets and losses, and samplers.

Schedules and samplers are diffusers' (DDPMScheduler for the forward process, DDIM / DPM-Solver++ for sampling).
The learned-sigma variational-bound term follows Improved DDPM (Nichol & Dhariwal 2021), as DiT and Latte train it.
"""
import math

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

MIN_SNR_GAMMA = 5.0


class Diffusion:
    def __init__(self, config):
        self.config = config
        self.scheduler = DDPMScheduler(
            num_train_timesteps=config.num_train_timesteps, beta_schedule=config.schedule,
            beta_start=config.beta_start, beta_end=config.beta_end, prediction_type=config.prediction,
            rescale_betas_zero_snr=config.rescale_zero_snr, clip_sample=False,
        )
        betas = self.scheduler.betas.double()
        alphas_cumprod = self.scheduler.alphas_cumprod.double()
        previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        self.betas, self.alphas_cumprod, self.alphas_cumprod_prev = betas, alphas_cumprod, previous
        posterior_variance = betas * (1 - previous) / (1 - alphas_cumprod)
        # log of the posterior variance, with the t=0 entry (zero) replaced by t=1's, as Improved DDPM does.
        self.posterior_log_variance = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
        self.log_betas = betas.log()
        self.posterior_mean_coef_x0 = betas * previous.sqrt() / (1 - alphas_cumprod)
        self.posterior_mean_coef_xt = (1 - previous) * (1 - betas).sqrt() / (1 - alphas_cumprod)
        self._tables_on: dict[torch.device, dict[str, torch.Tensor]] = {}

    def table(self, name: str, device: torch.device) -> torch.Tensor:
        """The fp64 schedule table `name` on `device`, copied there once: a copy per call would cross PCIe (and wait
        for it) in every training step."""
        device = torch.device(device)
        tables = self._tables_on.setdefault(device, {})
        if name not in tables:
            tables[name] = getattr(self, name).to(device)
        return tables[name]

    @property
    def num_timesteps(self) -> int:
        return self.config.num_train_timesteps

    def add_noise(self, x0, noise, timesteps):
        return self.scheduler.add_noise(x0, noise, timesteps)

    def target(self, x0, noise, timesteps):
        """What the model learns to predict: the noise, or v = sqrt(a) * noise - sqrt(1 - a) * x0."""
        return noise if self.config.prediction == "epsilon" else self.scheduler.get_velocity(x0, noise, timesteps)

    def snr(self, timesteps):
        alpha = self.table("alphas_cumprod", timesteps.device)[timesteps]
        return (alpha / (1 - alpha).clamp(min=1e-20)).float()

    def loss_weights(self, timesteps):
        """Per-sample weights: 1, or Min-SNR-gamma (Hang et al. 2023) in the form matching the prediction type."""
        if self.config.loss_weighting == "none":
            return torch.ones(timesteps.shape, device=timesteps.device)
        snr = self.snr(timesteps)
        clipped = snr.clamp(max=MIN_SNR_GAMMA)
        return clipped / snr.clamp(min=1e-8) if self.config.prediction == "epsilon" else clipped / (snr + 1)

    def training_loss(self, model_output, x0, noise, x_t, timesteps) -> torch.Tensor:
        """Per-sample loss [B]: weighted MSE on the mean prediction, plus the VB term when the model predicts sigma.
        Tensors are video-shaped [B, F, C, H, W]; a learned-sigma output has 2C channels."""
        channels = x0.shape[2]
        prediction, variance_values = model_output[:, :, :channels], model_output[:, :, channels:]
        mse = (prediction.float() - self.target(x0, noise, timesteps).float()).pow(2).mean(dim=(1, 2, 3, 4))
        loss = mse * self.loss_weights(timesteps)
        if variance_values.shape[2]:
            loss = loss + self.variational_bound(prediction.detach().float(), variance_values.float(), x0, x_t, timesteps)
        return loss

    # ------------------------------------------------------------------------------------------ learned sigma

    def predicted_x0(self, prediction, x_t, timesteps):
        alpha = self.table("alphas_cumprod", x_t.device)[timesteps].float().view(-1, 1, 1, 1, 1)
        if self.config.prediction == "epsilon":
            return (x_t - (1 - alpha).sqrt() * prediction) / alpha.sqrt()
        return alpha.sqrt() * x_t - (1 - alpha).sqrt() * prediction

    def variational_bound(self, prediction, variance_values, x0, x_t, timesteps):
        """KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) in bits per dim (decoder NLL at t=0), with the mean frozen so
        this term trains only the variance (the "learned range" parameterisation)."""
        def at(name):
            return self.table(name, x_t.device)[timesteps].float().view(-1, 1, 1, 1, 1)

        min_log, max_log = at("posterior_log_variance"), at("log_betas")
        fraction = (variance_values + 1) / 2
        model_log_variance = fraction * max_log + (1 - fraction) * min_log
        x0_pred = self.predicted_x0(prediction, x_t.float(), timesteps)
        model_mean = at("posterior_mean_coef_x0") * x0_pred + at("posterior_mean_coef_xt") * x_t
        true_mean = at("posterior_mean_coef_x0") * x0 + at("posterior_mean_coef_xt") * x_t
        true_log_variance = at("posterior_log_variance")
        kl = 0.5 * (-1.0 + model_log_variance - true_log_variance + torch.exp(true_log_variance - model_log_variance)
                    + (true_mean - model_mean) ** 2 * torch.exp(-model_log_variance))
        kl = kl.mean(dim=(1, 2, 3, 4)) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, model_mean, model_log_variance).mean(dim=(1, 2, 3, 4))
        vb = torch.where(timesteps == 0, nll / math.log(2.0), kl)
        return vb * self.num_timesteps / 1000.0  # DiT's scaling: keeps the term's size independent of T

    # ---------------------------------------------------------------------------------------------- sampling

    def sampler(self):
        """A fresh diffusers sampler matching the training schedule."""
        common = dict(num_train_timesteps=self.config.num_train_timesteps, beta_schedule=self.config.schedule,
                      beta_start=self.config.beta_start, beta_end=self.config.beta_end,
                      prediction_type=self.config.prediction)
        # Zero terminal SNR needs sampling to start at the last timestep ("trailing" spacing, Lin et al. 2024).
        spacing = "trailing" if self.config.rescale_zero_snr else "leading"
        if self.config.sampler == "dpm":
            return DPMSolverMultistepScheduler(**common, rescale_betas_zero_snr=self.config.rescale_zero_snr,
                                               timestep_spacing=spacing if spacing == "trailing" else "linspace")
        return DDIMScheduler(**common, rescale_betas_zero_snr=self.config.rescale_zero_snr, clip_sample=False,
                             set_alpha_to_one=False, timestep_spacing=spacing)


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x, mean, log_variance):
    """Log-likelihood of data in [-1, 1] quantised to 256 levels under a Gaussian (Ho et al. 2020)."""
    centred = x - mean
    inv_std = torch.exp(-0.5 * log_variance)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centred + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centred - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(x < -0.999, log_cdf_plus,
                            torch.where(x > 0.999, log_one_minus_cdf_min, torch.log((cdf_plus - cdf_min).clamp(min=1e-12))))
    return log_probs
