"""Model weights as safetensors: the live model and its EMA, in our key format (diffusers export: export.py)."""
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .precision import plain_state_dict


def plain_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors of the model's state as the unconverted model has it (no FP8 extras)."""
    return {k: v.detach().contiguous().cpu() for k, v in plain_state_dict(model).items()}


def save_weights(out_dir: Path, model: torch.nn.Module, ema=None) -> None:
    """out_dir/model.safetensors (+ ema.safetensors), each written to a temporary name and renamed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = {"model": model} | ({"ema": ema.model} if ema is not None else {})
    for name, module in targets.items():
        tmp = out_dir / f".{name}.safetensors.tmp"
        save_file(plain_state(module), str(tmp))
        tmp.replace(out_dir / f"{name}.safetensors")


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    return load_file(str(path))
