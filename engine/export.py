"""Export a run's EMA weights for inference: our format, and diffusers' LatteTransformer3DModel for t2v models.

`python -m ristretto.engine.export --run DIR [--out DIR]` writes
    <out>/ristretto/model.safetensors + config.json     (load with model.load_state_dict; config = the run's)
    <out>/diffusers/diffusion_pytorch_model.safetensors + config.json
                                                        (LatteTransformer3DModel.from_pretrained(<out>/diffusers))
<out> defaults to <run>/export. The weights are the EMA's (the live model's when the run kept no EMA), from the
finished run's weights/ folder, else from its newest good checkpoint. Each folder is written under a temporary name
and renamed.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .build import latent_geometry
from .checkpoint import CheckpointError, latest_checkpoint
from .config import ConfigError, config_from_dict, config_to_dict

log = logging.getLogger(__name__)


def run_ema_weights(run_dir: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """(state dict, where it came from): weights/ema.safetensors, weights/model.safetensors, or the newest good
    checkpoint's EMA (else its model)."""
    candidates = [run_dir / "weights" / "ema.safetensors", run_dir / "weights" / "model.safetensors"]
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None:
        candidates += [checkpoint / "ema.safetensors", checkpoint / "model.safetensors"]
    for path in candidates:
        if path.is_file():
            return load_file(str(path)), path
    raise FileNotFoundError(f"{run_dir}: no weights/ema.safetensors, weights/model.safetensors or good checkpoint")


def write_folder(out: Path, files: dict[str, object]) -> Path:
    """Write {name: tensors dict (safetensors) | dict (JSON)} into folder `out` atomically (temp name, rename)."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, content in files.items():
        if name.endswith(".safetensors"):
            save_file({k: v.contiguous() for k, v in content.items()}, str(tmp / name), metadata={"format": "pt"})
        else:
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def diffusers_folder_files(state: dict[str, torch.Tensor], config) -> dict[str, object] | None:
    """config.json + diffusion_pytorch_model.safetensors for LatteTransformer3DModel, or None when the model has no
    diffusers equivalent (class-conditional, pooled captions)."""
    from ristretto.model.diffusers_interop import diffusers_config, to_diffusers  # noqa: PLC0415

    if config.model.kind != "t2v" or config.model.pooled_caption:
        return None
    import diffusers  # noqa: PLC0415

    _, sample_size = latent_geometry(config)
    model_config = {"_class_name": "LatteTransformer3DModel", "_diffusers_version": diffusers.__version__,
                    **diffusers_config(config.model, config.data.frames, sample_size)}
    return {"config.json": model_config, "diffusion_pytorch_model.safetensors": to_diffusers(state)}


def export_run(run_dir: Path, out_dir: Path | None = None) -> dict[str, Path]:
    """Write the run's EMA weights in our format and (t2v) diffusers format; returns {"ristretto"|"diffusers": dir}."""
    run_dir = Path(run_dir)
    config = config_from_dict(json.loads((run_dir / "config.json").read_text()))
    state, source = run_ema_weights(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "export"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {"ristretto": write_folder(out_dir / "ristretto",
                                         {"model.safetensors": state, "config.json": config_to_dict(config)})}
    diffusers_files = diffusers_folder_files(state, config)
    if diffusers_files is None:
        log.info("export: model.kind=%s, pooled_caption=%s has no diffusers LatteTransformer3DModel equivalent; "
                 "wrote our format only", config.model.kind, config.model.pooled_caption)
    else:
        written["diffusers"] = write_folder(out_dir / "diffusers", diffusers_files)
    log.info("export: %s -> %s", source, ", ".join(str(p) for p in written.values()))
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ristretto-export", description="Export a run's EMA weights.")
    parser.add_argument("--run", required=True, type=Path, help="run directory (holds config.json)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: RUN/export)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not (args.run / "config.json").is_file():
        print(f"export: {args.run / 'config.json'} not found: --run must be a run directory", file=sys.stderr)
        return 2
    from .run_lock import RunLock  # noqa: PLC0415

    writes_into_run = args.out is None or args.run.resolve() in [args.out.resolve(), *args.out.resolve().parents]
    lock = RunLock(args.run, "--run") if writes_into_run else None  # one writer per run folder, the trainer included
    try:
        if lock is not None:
            lock.acquire()
        written = export_run(args.run, args.out)
    except (FileNotFoundError, ConfigError, CheckpointError, ValueError) as error:
        print(f"export: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("export: interrupted; the folders being written were left under temporary names", file=sys.stderr)
        return 130
    finally:
        if lock is not None:
            lock.release()
    for path in written.values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
