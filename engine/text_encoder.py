"""Caption encoders behind one interface: captions -> (embeddings [B, L, D], mask [B, L] bool).

`synthetic` is the offline default: a fixed, seeded random vector per word (plus a position signal), padded to a
fixed length with a mask — what T5 gives, without downloads. A T5 path or hub id loads transformers'
T5EncoderModel (engine/t5_encoder.py). The empty caption "" is the null caption for classifier-free guidance.
"""
import hashlib
import math

import torch


class SyntheticTextEncoder:
    """Deterministic word vectors: the same word always maps to the same [D] vector, for any vocabulary."""

    def __init__(self, channels: int, max_length: int, seed: int = 0):
        self.channels, self.max_length, self.seed = channels, max_length, seed
        self._cache: dict[str, torch.Tensor] = {}

    def word_vector(self, word: str) -> torch.Tensor:
        if word not in self._cache:
            digest = hashlib.sha256(f"{self.seed}:{word}".encode()).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
            self._cache[word] = torch.randn(self.channels, generator=generator)
        return self._cache[word]

    def position_vector(self, position: int) -> torch.Tensor:
        """Sin-cos signal so word order (e.g. "moving left" vs "left") is visible, as in a real encoder's output."""
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(0, self.channels, 2) / self.channels)
        angles = position * freqs
        return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten()[: self.channels] * 0.5

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings = torch.zeros(len(captions), self.max_length, self.channels)
        mask = torch.zeros(len(captions), self.max_length, dtype=torch.bool)
        for row, caption in enumerate(captions):
            words = caption.lower().split()[: self.max_length]
            for position, word in enumerate(words):
                embeddings[row, position] = self.word_vector(word) + self.position_vector(position)
            mask[row, : len(words)] = True
        # An empty caption keeps one unmasked all-zero token so attention over it is defined (T5 keeps its EOS token).
        mask[:, 0] = True
        return embeddings, mask


def build_text_encoder(model_config, device="cpu"):
    """The caption encoder named by `model.text_encoder`."""
    if model_config.text_encoder == "synthetic":
        return SyntheticTextEncoder(model_config.caption_channels, model_config.caption_length)
    from .t5_encoder import T5TextEncoder  # noqa: PLC0415 - needs transformers, loaded only when asked for

    return T5TextEncoder(model_config.text_encoder, max_length=model_config.caption_length, device=device)
