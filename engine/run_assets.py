"""Everything needed to sample from a finished run: its model with EMA weights, VAE, text encoder, diffusion."""
from pathlib import Path


from .build import build_plain_model, resolve_device
from .diffusion import Diffusion
from .text_encoder import build_text_encoder
from .vae import build_vae
from .weights import load_weights


def run_weights_path(run_dir: Path) -> Path:
    """EMA weights when the run kept an EMA, else the live model's."""
    for name in ("ema.safetensors", "model.safetensors"):
        if (run_dir / "weights" / name).is_file():
            return run_dir / "weights" / name
    raise FileNotFoundError(f"{run_dir / 'weights'}: no ema.safetensors or model.safetensors (has the run finished?)")


def load_inference_model(config, run_dir: Path):
    device = resolve_device(config.train.device)
    model = build_plain_model(config)
    model.load_state_dict(load_weights(run_weights_path(run_dir)))
    model = model.to(device).eval()
    vae = build_vae(config.model, device)
    text_encoder = build_text_encoder(config.model, device) if config.model.kind == "t2v" else None
    return model, vae, text_encoder, Diffusion(config.diffusion), device


