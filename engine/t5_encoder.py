"""T5 caption encoder (Latte-1 and PixArt use T5-v1.1-XXL): captions -> (embeddings [B, L, D] float32, mask [B, L] bool).

Captions are padded to `max_length` tokens and cut there; the mask marks real tokens. T5's tokenizer appends
</s> to every caption, so the empty caption "" (the null caption for classifier-free guidance) still has one
unmasked token and attention over it is defined.
"""
from __future__ import annotations

import torch


class T5TextEncoder:
    """transformers' T5EncoderModel + AutoTokenizer from a local folder or a hub id, frozen, in eval mode."""

    def __init__(self, path_or_hub_id: str, max_length: int = 120, device="cpu", dtype: torch.dtype | None = None):
        from transformers import AutoTokenizer, T5EncoderModel  # noqa: PLC0415 - the [hub] extra

        self.device, self.max_length = torch.device(device), max_length
        # fp16 overflows in T5's feed-forward; bf16 keeps fp32's range. fp32 on CPU, where bf16 matmuls are slow.
        dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.tokenizer = AutoTokenizer.from_pretrained(path_or_hub_id)
        self.model = T5EncoderModel.from_pretrained(path_or_hub_id, dtype=dtype).eval().requires_grad_(False)
        self.model.to(self.device)
        self.channels = self.model.config.d_model

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(list(captions), padding="max_length", max_length=self.max_length, truncation=True,
                                return_tensors="pt").to(self.device)
        hidden = self.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        return hidden.float(), tokens.attention_mask.bool()
