"""Sampling videos with classifier-free guidance, and writing them (videos + contact sheet) where people look.

`python -m ristretto.engine.sample --run DIR [--captions "a red circle moving left" ...] [--out DIR]` samples from
a finished or running run's EMA weights.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from .progress import progress_bar
from .video_io import contact_sheet, write_video


def conditions_for(config, prompts: list, text_encoder, device) -> dict:
    """Model conditions for captions (t2v) or class labels (class)."""
    if config.model.kind == "class":
        return {"label": torch.as_tensor(prompts, dtype=torch.long, device=device)}
    embeddings, mask = text_encoder(list(prompts))
    return {"caption": embeddings.to(device), "caption_mask": mask.to(device)}


def null_conditions_for(config, count: int, text_encoder, device) -> dict:
    """The unconditional input of classifier-free guidance: empty captions, or the null class."""
    if config.model.kind == "class":
        return conditions_for(config, [config.model.num_classes] * count, text_encoder, device)
    return conditions_for(config, [""] * count, text_encoder, device)


@torch.no_grad()
def generate(model, diffusion, conditions: dict, null_conditions: dict, shape, guidance_scale: float, steps: int,
             seed: int, device, autocast=None) -> torch.Tensor:
    """Denoise Gaussian noise of `shape` [B, F, C, H, W] into latents with the diffusers sampler, guided by CFG."""
    sampler = diffusion.sampler()
    sampler.set_timesteps(steps, device=device)
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(shape, generator=generator).to(device) * sampler.init_noise_sigma
    channels = shape[2]
    guided = guidance_scale != 1.0
    both = {k: torch.cat([conditions[k], null_conditions[k]]) for k in conditions} if guided else conditions
    for timestep in progress_bar(sampler.timesteps, desc="sampling", unit="step", leave=False):
        model_input = torch.cat([latents, latents]) if guided else latents
        model_input = sampler.scale_model_input(model_input, timestep)
        timesteps = torch.full((model_input.shape[0],), int(timestep), device=device, dtype=torch.long)
        with autocast() if autocast else torch.autocast(device_type=torch.device(device).type, enabled=False):
            output = model(model_input, timesteps, **both)[:, :, :channels].float()  # drop learned sigma
        if guided:
            cond, uncond = output.chunk(2)
            output = uncond + guidance_scale * (cond - uncond)
        latents = sampler.step(output, timestep, latents).prev_sample
    return latents


def write_samples(out_dir: Path, videos: torch.Tensor, captions: list[str], fps: int) -> list[Path]:
    """videos [B, F, 3, H, W] in [-1, 1] -> one video file per caption + contact_sheet.png in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (video, caption) in enumerate(zip(videos, captions)):
        slug = "".join(ch if ch.isalnum() else "_" for ch in caption)[:60].strip("_") or "sample"
        paths.append(write_video(out_dir / f"{index:02d}_{slug}", video, fps=fps))
    paths.append(contact_sheet(out_dir / "contact_sheet.png", list(videos), captions))
    # the exact captions (file names are lossy slugs), for report.html
    (out_dir / "captions.json").write_text(json.dumps({p.name: c for p, c in zip(paths, captions)}, indent=1) + "\n")
    return paths


def validation_prompts(config, dataset=None) -> tuple[list, list[str]]:
    """(prompts, titles): configured captions, else the synthetic held-out captions, else the dataset's first ones."""
    count = config.sample.num_samples
    if config.model.kind == "class":
        labels = [i % config.model.num_classes for i in range(count)]
        names = getattr(dataset, "class_names", None)
        titles = [names()[i] if callable(names) else f"class {i}" for i in labels]
        return labels, titles
    captions = list(config.sample.captions)
    if not captions and config.data.kind == "synthetic":
        from .synthetic import split_captions  # noqa: PLC0415

        captions = split_captions(seed=config.train.seed)[1]
    if not captions and dataset is not None:
        captions = [dataset[i]["caption"] for i in range(min(count, len(dataset)))]
    captions = captions[:count] if not config.sample.captions else captions
    return captions, captions


def sample_run(run_dir: Path, captions: list[str] | None, out_dir: Path | None, steps: int | None,
               guidance: float | None, seed: int | None) -> list[Path]:
    """Load a run's config and EMA weights, sample, write videos; returns the written paths."""
    from .config import config_from_dict  # noqa: PLC0415
    from .run_assets import load_inference_model  # noqa: PLC0415

    config = config_from_dict(json.loads((run_dir / "config.json").read_text()))
    if captions:
        config.sample.captions = captions
    model, vae, text_encoder, diffusion, device = load_inference_model(config, run_dir)
    prompts, titles = validation_prompts(config)
    if not config.sample.captions and config.model.kind == "t2v" and config.data.kind != "synthetic":
        raise SystemExit("sample: no captions given; pass --captions \"...\"")
    videos = sample_videos(config, model, vae, text_encoder, diffusion, prompts, device, steps, guidance, seed)
    return write_samples(out_dir or run_dir / "samples" / "manual", videos.cpu(), titles, config.sample.fps)


def sample_videos(config, model, vae, text_encoder, diffusion, prompts, device, steps=None, guidance=None,
                  seed=None, autocast=None) -> torch.Tensor:
    """Prompts -> decoded videos [B, F, 3, H, W] in [-1, 1]."""
    from .build import latent_geometry  # noqa: PLC0415

    channels, size = latent_geometry(config)
    conditions = conditions_for(config, prompts, text_encoder, device)
    null = null_conditions_for(config, len(prompts), text_encoder, device)
    shape = (len(prompts), config.data.frames, channels, size, size)
    latents = generate(model, diffusion, conditions, null, shape,
                       config.diffusion.guidance_scale if guidance is None else guidance,
                       steps or config.diffusion.sample_steps, config.sample.seed if seed is None else seed, device,
                       autocast)
    return vae.decode(latents).clamp(-1, 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ristretto-sample", description="Sample videos from a Ristretto run.")
    parser.add_argument("--run", required=True, type=Path, help="run directory (holds config.json and weights)")
    parser.add_argument("--captions", nargs="*", default=None, help="captions to sample (default: validation ones)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: RUN/samples/manual)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: diffusion.sample_steps)")
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale (default: diffusion.guidance_scale)")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    if not (args.run / "config.json").is_file():
        print(f"sample: {args.run / 'config.json'} not found: --run must be a run directory", file=sys.stderr)
        return 2
    for path in sample_run(args.run, args.captions, args.out, args.steps, args.guidance, args.seed):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
