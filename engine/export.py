"""Export a run's EMA weights for inference: our format, and a diffusers `LattePipeline` folder for t2v models.

`python -m ristretto.engine.export --run DIR [--out DIR] [--force]` writes
    <out>/export.json                   the training step, where the weights came from, the run's config
    <out>/ristretto/model.safetensors + config.json     (load with model.load_state_dict; config = the run's)
    <out>/diffusers/                    LattePipeline.from_pretrained(<out>/diffusers[, vae=..., text_encoder=...])
        model_index.json                the pipeline's components; "_ristretto" names the run's VAE / text encoder
        transformer/                    LatteTransformer3DModel (config.json "_ristretto": step, zero_sigma_channels)
        scheduler/                      the run's sampler (DDIM or DPM-Solver++) with its prediction type, timestep
                                        spacing and zero-terminal-SNR setting
        vae/, text_encoder/, tokenizer/ copies (hard links where possible) when the run used local folders; hub
                                        ids and the synthetic encoder are named in model_index.json and README.md
        README.md                       how to load and run it
<out> defaults to <run>/export. The weights are the EMA's (the live model's when the run kept no EMA) of the newest
good checkpoint, else of the run's weights/ folder. A model without learned sigma is exported with zero sigma channels
(out_channels = 2 * in_channels): diffusers' LattePipeline always keeps the first half of the output channels.
An export of a newer step is not overwritten by an older one unless --force. Each folder is written under a
temporary name and renamed.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .build import latent_geometry
from .checkpoint import MANIFEST, CheckpointError, latest_checkpoint
from .config import ConfigError, config_from_dict, config_to_dict
from .progress import progress_bar

log = logging.getLogger(__name__)
RECORD = "export.json"


class ExportError(ValueError):
    """An export that would lose something (an older checkpoint over a newer export): one line saying what to do."""


def run_ema_weights(run_dir: Path) -> tuple[dict[str, torch.Tensor], Path, int | None]:
    """(state dict, where it came from, training step or None): the newest good checkpoint's EMA (else its model),
    else weights/ema.safetensors or weights/model.safetensors. The final checkpoint holds the same weights as
    weights/; after a resumed run stopped early, only the checkpoint is current."""
    checkpoint = latest_checkpoint(run_dir)
    candidates = []
    if checkpoint is not None:
        step = json.loads((checkpoint / MANIFEST).read_text())["step"]
        candidates += [(checkpoint / "ema.safetensors", step), (checkpoint / "model.safetensors", step)]
    candidates += [(run_dir / "weights" / "ema.safetensors", None), (run_dir / "weights" / "model.safetensors", None)]
    for path, step in candidates:
        if path.is_file():
            return load_file(str(path)), path, step
    raise FileNotFoundError(f"{run_dir}: no good checkpoint, weights/ema.safetensors or weights/model.safetensors")


def write_folder(out: Path, write) -> Path:
    """Call write(tmp folder), then replace folder `out` by it (temp name, rename)."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def write_json(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2) + "\n")


def write_safetensors(path: Path, state: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})


def link_or_copy(source: str, target: str) -> None:
    """Hard link (no second copy of a multi-GB encoder) when on the same filesystem, else copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


# -------------------------------------------------------------------------------------------- diffusers pipeline

def has_diffusers_equivalent(config) -> bool:
    return config.model.kind == "t2v" and not config.model.pooled_caption and not config.model.caption_adaln


def transformer_files(state: dict[str, torch.Tensor], config, step: int | None) -> tuple[dict, dict]:
    """(config.json, state dict) of the LatteTransformer3DModel; without learned sigma, with zero sigma channels."""
    import diffusers  # noqa: PLC0415

    from ristretto.model.diffusers_interop import (add_zero_sigma_channels, diffusers_config,  # noqa: PLC0415
                                                   to_diffusers)

    _, sample_size = latent_geometry(config)
    model_config = diffusers_config(config.model, config.data.frames, sample_size)
    theirs = to_diffusers(state)
    zero_sigma = not config.model.learn_sigma
    if zero_sigma:
        theirs = add_zero_sigma_channels(theirs, config.model.in_channels)
        model_config["out_channels"] = 2 * config.model.in_channels
    return ({"_class_name": "LatteTransformer3DModel", "_diffusers_version": diffusers.__version__, **model_config,
             "_ristretto": {"step": step, "zero_sigma_channels": zero_sigma}}, theirs)


def copy_vae(source: str, folder: Path, scaling_factor: float) -> None:
    """The run's local AutoencoderKL folder, with the scaling factor the run used (the pipeline reads it there)."""
    shutil.copytree(source, folder, copy_function=link_or_copy, ignore=shutil.ignore_patterns("config.json"))
    vae_config = json.loads((Path(source) / "config.json").read_text())
    write_json(folder / "config.json", vae_config | {"scaling_factor": scaling_factor})


def copy_text_encoder(source: str, out: Path) -> list[str]:
    """The run's local T5 folder -> text_encoder/ (model files) and tokenizer/ (saved by the tokenizer itself);
    returns model_index entries [library, class] for both."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    shutil.copytree(source, out / "text_encoder", copy_function=link_or_copy)
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.save_pretrained(out / "tokenizer")
    return ["transformers", type(tokenizer).__name__]


def write_pipeline(out: Path, state: dict[str, torch.Tensor], config, step: int | None) -> None:
    """The LattePipeline layout in folder `out` (see the module docstring)."""
    import diffusers  # noqa: PLC0415

    from .diffusion import Diffusion  # noqa: PLC0415

    model_config, theirs = transformer_files(state, config, step)
    write_json(out / "transformer" / "config.json", model_config)
    write_safetensors(out / "transformer" / "diffusion_pytorch_model.safetensors", theirs)
    scheduler = Diffusion(config.diffusion).sampler()
    scheduler.save_pretrained(out / "scheduler")
    model = config.model
    index = {"_class_name": "LattePipeline", "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", type(scheduler).__name__],
             "transformer": ["diffusers", "LatteTransformer3DModel"],
             "vae": [None, None], "text_encoder": [None, None], "tokenizer": [None, None],
             "_ristretto": {"step": step, "vae": model.vae, "vae_scaling_factor": model.vae_scaling_factor,
                            "text_encoder": model.text_encoder, "caption_length": model.caption_length}}
    if model.vae != "identity" and Path(model.vae).is_dir():
        copy_vae(model.vae, out / "vae", model.vae_scaling_factor)
        index["vae"] = ["diffusers", "AutoencoderKL"]
    if model.text_encoder != "synthetic" and Path(model.text_encoder).is_dir():
        index["tokenizer"] = copy_text_encoder(model.text_encoder, out)
        index["text_encoder"] = ["transformers", "T5EncoderModel"]
    write_json(out / "model_index.json", index)
    (out / "README.md").write_text(pipeline_readme(config, index))


def pipeline_readme(config, index: dict) -> str:
    """How to load this folder: which components must be passed in, and what the pipeline does not do."""
    model = config.model
    synthetic, pixels = model.text_encoder == "synthetic", model.vae == "identity"
    passed = {  # name: (value, comment) for components this folder does not hold
        "vae": ("None", "pixel space: the frames are the latents") if pixels else
               (f"AutoencoderKL.from_pretrained({model.vae!r})", f"its config.scaling_factor must be "
                                                                  f"{model.vae_scaling_factor}"),
        "text_encoder": ("None", "synthetic captions: pass embeddings") if synthetic else
                        (f"T5EncoderModel.from_pretrained({model.text_encoder!r})", ""),
        "tokenizer": ("None", "") if synthetic else (f"AutoTokenizer.from_pretrained({model.text_encoder!r})", ""),
    }
    arguments = "".join(f"\n    {name}={value},{'  # ' + comment if comment else ''}"
                        for name, (value, comment) in passed.items() if index[name] == [None, None])
    embeddings = ("from ristretto.engine.text_encoder import build_text_encoder  # with the run's config.model\n"
                  "prompt_embeds, _ = build_text_encoder(config.model)([\"a red circle moving left\"])\n"
                  "negative_prompt_embeds, _ = build_text_encoder(config.model)([\"\"])\n") if synthetic else ""
    prompt = ("prompt_embeds=prompt_embeds, negative_prompt=None, negative_prompt_embeds=negative_prompt_embeds"
              if synthetic else "prompt=\"a red circle moving left\"")
    output = ', output_type="latent"' if pixels else ""
    return f"""# Ristretto export (step {index['_ristretto']['step']}) for diffusers' LattePipeline

```python
from diffusers import AutoencoderKL, LattePipeline
from transformers import AutoTokenizer, T5EncoderModel

pipe = LattePipeline.from_pretrained("<this folder>",{arguments})
{embeddings}video = pipe({prompt}, video_length={config.data.frames}, guidance_scale={config.diffusion.guidance_scale},
             num_inference_steps={config.diffusion.sample_steps}{output}).frames
```

- The scheduler is the run's: {index['scheduler'][1]}, prediction {config.diffusion.prediction}, zero terminal SNR
  {config.diffusion.rescale_zero_snr}.
- The pipeline pads captions to 120 tokens and never passes a caption mask to the transformer. With one prompt it cuts
  the embeddings to the prompt's real tokens, which equals masking; with several prompts, or with prompt_embeds you
  pass, padded tokens are attended to. Ristretto trained with masked captions of {model.caption_length} tokens: for
  the same result pass one prompt at a time.
- transformer/ has {'zero sigma channels (the run did not learn sigma; the pipeline drops them)'
                    if not model.learn_sigma else 'learned sigma channels (the pipeline drops them for DDIM)'}.
"""


# ---------------------------------------------------------------------------------------------------- the export

def check_not_older(out_dir: Path, step: int | None, force: bool) -> None:
    """Refuse to replace an export of a later step by an earlier one (e.g. a stale run folder), unless forced."""
    record = out_dir / RECORD
    if force or step is None or not record.is_file():
        return
    existing = json.loads(record.read_text()).get("step")
    if existing is not None and existing > step:
        raise ExportError(f"{out_dir} holds an export of step {existing}, newer than this run's step {step}; pass "
                          f"--force to overwrite it, or --out another folder")


def export_run(run_dir: Path, out_dir: Path | None = None, force: bool = False) -> dict[str, Path]:
    """Write the run's EMA weights in our format and (t2v) the LattePipeline folder; returns
    {"ristretto"|"diffusers": dir}."""
    run_dir = Path(run_dir)
    config = config_from_dict(json.loads((run_dir / "config.json").read_text()))
    state, source, step = run_ema_weights(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "export"
    check_not_older(out_dir, step, force)
    out_dir.mkdir(parents=True, exist_ok=True)

    def write_ours(folder: Path) -> None:
        write_safetensors(folder / "model.safetensors", state)
        write_json(folder / "config.json", config_to_dict(config))

    # one step per folder: the diffusers one converts the weights and may copy a multi-GB VAE / T5
    bar = progress_bar(total=1 + has_diffusers_equivalent(config), desc=f"export to {out_dir}", unit="folder")
    with bar:
        written = {"ristretto": write_folder(out_dir / "ristretto", write_ours)}
        bar.update()
        if has_diffusers_equivalent(config):
            written["diffusers"] = write_folder(out_dir / "diffusers",
                                                lambda folder: write_pipeline(folder, state, config, step))
            bar.update()
        else:
            shutil.rmtree(out_dir / "diffusers", ignore_errors=True)  # never leave another run's pipeline beside ours
            log.info("export: model.kind=%s, pooled_caption=%s, caption_adaln=%s has no diffusers "
                     "LatteTransformer3DModel equivalent; wrote our format only", config.model.kind,
                     config.model.pooled_caption, config.model.caption_adaln)
    write_json(out_dir / RECORD, {"step": step, "source": str(source), "run": str(run_dir),
                                  "folders": sorted(written), "config": config_to_dict(config)})
    log.info("export: step %s from %s -> %s", step, source, ", ".join(str(p) for p in written.values()))
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ristretto-export", description="Export a run's EMA weights.")
    parser.add_argument("--run", required=True, type=Path, help="run directory (holds config.json)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: RUN/export)")
    parser.add_argument("--force", action="store_true", help="overwrite an export of a later training step")
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
        written = export_run(args.run, args.out, args.force)
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
