"""Model weights as safetensors in our key format (written by distributed.export_weights for any number of ranks;
diffusers export: export.py)."""
from pathlib import Path

import torch
from safetensors.torch import load_file

from .precision import plain_state_dict


def plain_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors of the model's state as the unconverted model has it (no FP8 extras)."""
    return {k: v.detach().contiguous().cpu() for k, v in plain_state_dict(model).items()}


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    return load_file(str(path))
