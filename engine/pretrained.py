"""Start a run from pretrained weights (model.init, model.init_spatial) and train only part of it (model.freeze).

At config time (`adopt_pretrained_fields`, called by config.build_config) only the pretrained folder's config and
safetensors headers are read: the model-shape fields come from them, an explicit --set that contradicts them is a
one-line ConfigError, and every missing, unexpected or mis-shaped key is named before anything is written. At build
time (`initialise_from_pretrained`, engine/build.py) the weights are loaded. Position embeddings are fixed sin-cos
tables computed from data.frames and data.resolution, so fine-tuning at another size than the pretrained one needs
nothing else.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ristretto.model.diffusers_interop import (add_zero_sigma_channels, drop_zero_sigma_channels, from_diffusers,
                                               model_fields_from_diffusers, to_diffusers)
from ristretto.model.pixart_interop import SIZE_EMBEDDERS, identity_temporal_blocks, spatial_state_from_pixart

from .config import ConfigError, validate
from .weights import (DIFFUSERS_WEIGHTS, diffusers_model_folder, diffusers_weight_files, load_weight_files,
                      our_weights_file, weight_shapes)

log = logging.getLogger(__name__)

# ModelConfig fields that pretrained weights fix (the parameter shapes and which modules exist).
SHAPE_FIELDS = ("kind", "in_channels", "learn_sigma", "patch_size", "hidden_size", "depth", "num_heads", "mlp_ratio",
                "caption_channels", "num_classes", "pooled_caption", "caption_adaln")
LIST_AT_MOST = 20


@dataclass
class Pretrained:
    key: str            # "model.init" | "model.init_spatial"
    layout: str         # "latte" (diffusers LatteTransformer3DModel) | "pixart" | "ristretto" (our key format)
    files: list[Path]   # safetensors file(s)
    fields: dict        # ModelConfig fields the weights fix
    zero_sigma: bool = False  # a diffusers export of ours whose sigma channels are zero padding

    def describe(self) -> str:
        return f"{self.key}={self.files[0].parent}"


def find_pretrained(key: str, path: str) -> Pretrained:
    """What `path` holds, or a ConfigError saying what was expected there."""
    folder = Path(path)
    expected_class = "PixArtTransformer2DModel" if key == "model.init_spatial" else "LatteTransformer3DModel"
    model_folder = diffusers_model_folder(folder) if folder.is_dir() else None
    if model_folder is not None:
        config = json.loads((model_folder / "config.json").read_text())
        if config.get("_class_name", expected_class) != expected_class:
            hint = " (a PixArt image model goes to model.init_spatial)" if key == "model.init" else ""
            raise ConfigError(f"{key}={path}: {model_folder / 'config.json'} describes a {config['_class_name']}, "
                              f"expected a {expected_class}{hint}")
        try:
            fields = model_fields_from_diffusers(config)
        except ValueError as error:
            raise ConfigError(f"{key}={path}: {error}") from None
        layout = "pixart" if key == "model.init_spatial" else "latte"
        return Pretrained(key, layout, diffusers_weight_files(model_folder), fields,
                          config.get("_ristretto", {}).get("zero_sigma_channels", False))
    ours = our_weights_file(folder) if key == "model.init" and folder.is_dir() else None
    if ours is not None:
        weights, config_path = ours
        saved = json.loads(config_path.read_text())["model"]
        return Pretrained(key, "ristretto", [weights], {name: saved[name] for name in SHAPE_FIELDS if name in saved})
    ours_too = " or one of our run / weights / checkpoint / export folders" if key == "model.init" else ""
    raise ConfigError(f"{key}={path}: not a diffusers {expected_class} folder (config.json + {DIFFUSERS_WEIGHTS} or "
                      f"its .index.json shards, here or in transformer/){ours_too}")


def adopt_pretrained_fields(config, explicit: set[str]) -> None:
    """Take the model-shape fields from model.init / model.init_spatial; `explicit` = the keys given with --set."""
    model = config.model
    if model.init and model.init_spatial:
        raise ConfigError("model.init and model.init_spatial: give one (init loads a whole video model, init_spatial "
                          "an image model into the spatial blocks)")
    pretrained = find_pretrained(*(("model.init", model.init) if model.init else ("model.init_spatial",
                                                                                  model.init_spatial)))
    conflicts = [f"model.{name}={getattr(model, name)!r} (pretrained: {value!r})"
                 for name, value in pretrained.fields.items()
                 if f"model.{name}" in explicit and getattr(model, name) != value]
    if conflicts:
        raise ConfigError(f"{pretrained.describe()}: the pretrained model fixes the model shape and these --set "
                          f"differ from it: {', '.join(conflicts)}; drop them")
    changed = {name: value for name, value in pretrained.fields.items() if getattr(model, name) != value}
    for name, value in pretrained.fields.items():
        setattr(model, name, value)
    if changed:
        log.info("%s: model fields from the pretrained model: %s", pretrained.describe(),
                 ", ".join(f"{k}={v!r}" for k, v in changed.items()))
    if model.vae == "identity" and model.in_channels != 3 and config.data.kind != "cached":
        raise ConfigError(f"{pretrained.describe()}: the pretrained model takes {model.in_channels}-channel latents "
                          f"but model.vae=identity feeds it RGB pixels; set model.vae to its VAE (Latte-1, "
                          f"PixArt-alpha: stabilityai/sd-vae-ft-ema) or use data.kind=cached")
    check_pretrained_keys(validate(config), pretrained)


# --------------------------------------------------------------------------------------------------- key checks

def expected_shapes(config, pretrained: Pretrained) -> dict[str, tuple[int, ...]]:
    """{key: shape} the pretrained files must hold for the configured model, in their own key format."""
    from ristretto.model.latte import latte_from_config  # noqa: PLC0415

    from .build import latent_geometry  # noqa: PLC0415

    _, sample_size = latent_geometry(config)
    with torch.device("meta"):
        state = latte_from_config(config.model, config.data.frames, sample_size).state_dict()
    if pretrained.layout == "ristretto":
        return {key: tuple(value.shape) for key, value in state.items()}
    theirs = to_diffusers(state)
    if pretrained.zero_sigma:
        theirs = add_zero_sigma_channels(theirs, config.model.in_channels)
    if pretrained.layout == "pixart":
        theirs = {k: v for k, v in theirs.items() if not k.startswith("temporal_transformer_blocks.")}
    return {key: tuple(value.shape) for key, value in theirs.items()}


def listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:LIST_AT_MOST])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > LIST_AT_MOST else "")


def check_pretrained_keys(config, pretrained: Pretrained) -> None:
    """One ConfigError naming every missing, unexpected and mis-shaped key (PixArt: also a depth mismatch)."""
    given = {k: v for k, v in weight_shapes(pretrained.files).items() if not k.startswith(SIZE_EMBEDDERS)}
    if pretrained.layout == "pixart":
        depth = 1 + max(int(k.split(".")[1]) for k in given if k.startswith("transformer_blocks."))
        if depth != config.model.depth:
            raise ConfigError(f"{pretrained.describe()}: the PixArt model has {depth} blocks but model.depth="
                              f"{config.model.depth}; each of our spatial blocks takes one PixArt block")
    expected = expected_shapes(config, pretrained)
    problems = []
    if missing := sorted(set(expected) - set(given)):
        problems.append(f"missing keys: {listing(missing)}")
    if unexpected := sorted(set(given) - set(expected)):
        problems.append(f"unexpected keys: {listing(unexpected)}")
    if mismatched := [f"{k} {list(given[k])} (expected {list(expected[k])})" for k in sorted(set(given) & set(expected))
                      if given[k] != expected[k]]:
        problems.append(f"mismatched shapes: {listing(mismatched)}")
    if problems:
        raise ConfigError(f"{pretrained.describe()}: {'; '.join(problems)}")


# ----------------------------------------------------------------------------------------------- build time

def initialise_from_pretrained(model: nn.Module, config) -> None:
    """Load model.init (all weights) or model.init_spatial (all but the temporal blocks, which start as the
    identity) into `model`; nothing when neither is set."""
    key, path = ("model.init", config.model.init) if config.model.init else ("model.init_spatial",
                                                                               config.model.init_spatial)
    if not path:
        return
    pretrained = find_pretrained(key, path)
    state = load_weight_files(pretrained.files)
    if pretrained.layout == "ristretto":
        model.load_state_dict(state)
    elif pretrained.layout == "latte":
        if pretrained.zero_sigma:
            state = drop_zero_sigma_channels(state, config.model.in_channels)
        model.load_state_dict(from_diffusers(state))
    else:
        spatial = spatial_state_from_pixart(state, config.data.resolution, config.data.resolution)
        result = model.load_state_dict(spatial, strict=False)
        temporal = {f"blocks.{i}." for i in range(1, len(model.blocks), 2)}
        not_temporal = [k for k in result.missing_keys if not any(k.startswith(p) for p in temporal)]
        if not_temporal or result.unexpected_keys:
            raise ValueError(f"{pretrained.describe()}: missing {not_temporal}, unexpected {result.unexpected_keys}")
        identity_temporal_blocks(model)
    log.info("%s: loaded %d tensors from %s", key, len(state), ", ".join(str(f) for f in pretrained.files))


def apply_freeze(model: nn.Module, mode: str) -> None:
    """model.freeze=spatial: only the temporal blocks keep requires_grad, so nothing else gets gradients or (with an
    optimizer built from trainable parameters) optimizer state."""
    if mode == "none":
        return
    model.requires_grad_(False)
    for block in model.blocks[1::2]:
        block.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("model.freeze=%s: training %.2fM of %.2fM parameters (the temporal blocks)", mode, trainable / 1e6,
             sum(p.numel() for p in model.parameters()) / 1e6)
