"""Model weights as safetensors in our key format (written by distributed.export_weights for any number of ranks;
diffusers export: export.py)."""
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .precision import plain_state_dict


def plain_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors of the model's state as the unconverted model has it (no FP8 extras)."""
    return {k: v.detach().contiguous().cpu() for k, v in plain_state_dict(model).items()}


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    return load_file(str(path))


# ------------------------------------------------------------------------------------- pretrained folders (model.init)

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
OUR_WEIGHTS = ("ema.safetensors", "model.safetensors")  # the EMA when the run kept one


def diffusers_model_folder(path: Path) -> Path | None:
    """The folder of a diffusers model (config.json + single or sharded safetensors): `path` itself, or its
    transformer/ subfolder when `path` is a pipeline (e.g. Latte-1 or PixArt-alpha from the hub)."""
    for folder in (path, path / "transformer"):
        if (folder / "config.json").is_file() and ((folder / DIFFUSERS_WEIGHTS).is_file()
                                                   or (folder / f"{DIFFUSERS_WEIGHTS}.index.json").is_file()):
            return folder
    return None


def read_diffusers_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def diffusers_weight_files(folder: Path) -> list[Path]:
    """The safetensors file(s) of a diffusers model folder: one file, or the shards its index names."""
    if (folder / DIFFUSERS_WEIGHTS).is_file():
        return [folder / DIFFUSERS_WEIGHTS]
    weight_map = json.loads((folder / f"{DIFFUSERS_WEIGHTS}.index.json").read_text())["weight_map"]
    return [folder / shard for shard in sorted(set(weight_map.values()))]


def load_weight_files(files: list[Path]) -> dict[str, torch.Tensor]:
    state = {}
    for path in files:
        state.update(load_file(str(path)))
    return state


def weight_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """{key: shape} from the safetensors headers alone (nothing loaded): to check a pretrained folder at config time."""
    shapes = {}
    for path in files:
        with safe_open(str(path), "pt") as handle:
            shapes.update({key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()})
    return shapes


def our_weights_file(path: Path) -> tuple[Path, Path] | None:
    """(weights file, the config.json of the run that wrote it) for one of our folders: a run (its weights/, else its
    newest good checkpoint), weights/, a checkpoint, or an export's ristretto/; None when `path` is none of them."""
    from .checkpoint import latest_checkpoint  # noqa: PLC0415

    if (path / "config.json").is_file() and ((path / "weights").is_dir() or (path / "checkpoints").is_dir()):
        newest = latest_checkpoint(path)  # newer than weights/ when a resumed run stopped before its end
        folders, config = ([newest] if newest else []) + [path / "weights"], path / "config.json"
    else:
        folders = [path]
        config = next((folder / "config.json" for folder in (path, path.parent, path.parent.parent)
                       if (folder / "config.json").is_file()), None)
    for folder in folders:
        for name in OUR_WEIGHTS:
            if (folder / name).is_file() and config is not None:
                return folder / name, config
    return None
