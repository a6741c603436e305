"""Exponential moving average of the weights, updated once per optimizer step (or every k-th); samples and exports
use it.

The update is one multi-tensor lerp over all parameters (`torch._foreach_lerp_`), not a Python loop of per-tensor
kernels. `every=k` updates every k-th optimizer step with the decay raised to the k-th power, which keeps the same
averaging horizon for a k-times smaller cost. `device="cpu"` keeps the copy in host memory (frees one model's worth
of accelerator memory); its update copies the live weights to the host, which waits for the device, so pair it with
every > 1.
"""
import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float, warmup: bool = True, every: int = 1,
                 device: torch.device | str | None = None):
        if every < 1:
            raise ValueError(f"train.ema_every: must be >= 1, got {every}")
        self.decay, self.warmup, self.every = decay, warmup, every
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        if device is not None:
            self.model.to(device)
        self._pairs: tuple[int, list[torch.Tensor], list[torch.Tensor]] | None = None

    def decay_at(self, step: int) -> float:
        """min(decay, (1 + step) / (10 + step)) with warmup, so early EMA weights follow the fast-changing model."""
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    def due(self, step: int) -> bool:
        """Whether the optimizer step that follows `step` earlier ones updates the EMA (every k-th: k, 2k, ...)."""
        return (step + 1) % self.every == 0

    def _matched(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(EMA params, live params) paired by name, found once per live model."""
        if self._pairs is None or self._pairs[0] != id(model):
            ema_params = dict(self.model.named_parameters())
            live = [(ema_params[name], param) for name, param in model.named_parameters()]
            self._pairs = (id(model), [e for e, _ in live], [p for _, p in live])
        return self._pairs[1], self._pairs[2]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """ema <- decay^k * ema + (1 - decay^k) * live after optimizer step `step` (0-based), on every k-th step."""
        if not self.due(step):
            return
        decay = self.decay_at(step) ** self.every
        ema_params, live_params = self._matched(model)
        live = [p.detach().to(e.device, e.dtype) for e, p in zip(ema_params, live_params)]
        torch._foreach_lerp_(ema_params, live, 1.0 - decay)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
