"""Video <-> latents: the identity (pixel space) or a diffusers AutoencoderKL applied frame by frame.

`encode(video [B, F, 3, H, W] in [-1, 1]) -> latents [B, F, C, H/f, W/f]` times the scaling factor;
`decode(latents) -> video`. Both run frames in chunks of `chunk_size` so a 16x512^2 clip fits in memory.

Encoding takes the posterior's mean by default, not a sample: the SD VAE's posterior std is tiny next to its mean,
so the sample adds little augmentation, while the mean makes an item's latents a pure function of its pixels:
live encoding equals the cache and a resumed run sees the same latents. Pass sample=True for Latte/DiT's behaviour
(`latent_dist.sample()`).
"""
from __future__ import annotations

import torch


class IdentityVAE:
    """Pixel space: latents are the video itself."""

    latent_channels, downsample_factor, scaling_factor = 3, 1, 1.0

    def encode(self, video: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        return video

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


class KLVideoVAE:
    """A diffusers AutoencoderKL over the frames of a video. The decoder is loaded on the first decode()."""

    def __init__(self, path_or_hub_id: str, scaling_factor: float, device="cpu", dtype=torch.float32,
                 chunk_size: int = 16, load_decoder: bool = False):
        from diffusers import AutoencoderKL  # noqa: PLC0415

        self.path, self.scaling_factor, self.chunk_size = path_or_hub_id, scaling_factor, chunk_size
        self.device, self.dtype = torch.device(device), dtype
        self.model = AutoencoderKL.from_pretrained(path_or_hub_id, torch_dtype=dtype).eval().requires_grad_(False)
        if not load_decoder:
            self.model.decoder = self.model.post_quant_conv = None  # half the weights; most callers only encode
        self.model.to(self.device)
        self.latent_channels = self.model.config.latent_channels
        self.downsample_factor = 2 ** (len(self.model.config.block_out_channels) - 1)

    def _chunks(self, video: torch.Tensor):
        """[B, F, c, h, w] -> chunks of at most chunk_size frames [n, c, h, w] on the VAE's device and dtype."""
        frames = video.flatten(0, 1)
        for start in range(0, frames.shape[0], self.chunk_size):
            yield frames[start:start + self.chunk_size].to(self.device, self.dtype)

    @torch.no_grad()
    def encode(self, video: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None):
        """[B, F, 3, H, W] in [-1, 1] -> [B, F, C, H/f, W/f] float32 (posterior mean, or a sample), scaled."""
        latents = []
        for chunk in self._chunks(video):
            posterior = self.model.encode(chunk).latent_dist
            latents.append((posterior.sample(generator) if sample else posterior.mean).float())
        return torch.cat(latents).unflatten(0, video.shape[:2]) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, F, C, h, w] scaled latents -> [B, F, 3, h*f, w*f] float32 video, clamped to [-1, 1]."""
        self._ensure_decoder()
        frames = [self.model.decode(chunk / self.scaling_factor).sample.float()
                  for chunk in self._chunks(latents)]
        return torch.cat(frames).clamp_(-1, 1).unflatten(0, latents.shape[:2])

    def _ensure_decoder(self) -> None:
        if self.model.decoder is not None:
            return
        from diffusers import AutoencoderKL  # noqa: PLC0415

        full = AutoencoderKL.from_pretrained(self.path, torch_dtype=self.dtype).eval().requires_grad_(False)
        self.model.decoder, self.model.post_quant_conv = full.decoder.to(self.device), full.post_quant_conv.to(self.device)


def build_vae(model_config, device="cpu", dtype: torch.dtype = torch.float32, chunk_size: int = 16):
    """model.vae: "identity" (pixel space) or an AutoencoderKL path / hub id, scaled by model.vae_scaling_factor."""
    if model_config.vae == "identity":
        return IdentityVAE()
    return KLVideoVAE(model_config.vae, model_config.vae_scaling_factor, device, dtype, chunk_size)
