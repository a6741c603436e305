"""Encode a dataset once into VAE latents + caption embeddings, and read it back without loading either encoder.

    python -m ristretto.engine.cache --preset latte-t2v-512 --set data.kind=captioned \
        --set data.manifest=clips.csv --out cache/clips
    ristretto-train --preset latte-t2v-512 --set data.kind=cached --set data.cache_dir=cache/clips

Layout of --out:
  manifest.json            what the cache holds: sizes, shapes, encoders, shards (and "complete" once all are written)
  shard_00000.safetensors  rows [i*S, (i+1)*S) of the dataset, S = --shard-size, minus unusable samples:
                             latents [n, F + num_images, C, h, w] bf16, caption_embeds [n, L, D] bf16,
                             caption_mask [n, L] bool, labels [n] int64, and with stills
                             image_caption_embeds [n, num_images, L, D] bf16, image_caption_mask [n, num_images, L];
                           metadata: "captions" and "image_captions" (JSON lists), "rows".
Clips are encoded with centred crops (the dataset's augment=False) and the VAE posterior's mean, so the cache is a
pure function of the data and the config. Resumable: a shard is written under a temporary name and renamed, and a
rerun skips the shards that exist.
"""
from __future__ import annotations

import argparse
import bisect
import json
import logging
import os
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from .config import ConfigError, RunConfig, build_config
from .video_data import DataError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# Fields of manifest.json that must equal the training config's: (manifest key, config key).
CHECKED_FIELDS = (("frames", "data.frames"), ("num_images", "data.num_images"), ("resolution", "data.resolution"),
                  ("latent_channels", "model.in_channels"), ("caption_length", "model.caption_length"),
                  ("caption_channels", "model.caption_channels"), ("vae", "model.vae"),
                  ("vae_scaling_factor", "model.vae_scaling_factor"), ("text_encoder", "model.text_encoder"))


NULL_CAPTION = "null_caption.safetensors"


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def config_value(config: RunConfig, key: str):
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


# ----------------------------------------------------------------------------------------------------------- reading

class CachedLatents(Dataset):
    """Items {"latents" [F, C, h, w], "caption_embeds" [L, D], "caption_mask" [L] bool, "label", "caption"}
    (float32), plus "image_caption_embeds" [I, L, D], "image_caption_mask" [I, L], "image_captions" with stills."""

    def __init__(self, cache_dir: str | Path, config: RunConfig):
        self.dir = Path(cache_dir)
        self.manifest = read_manifest(self.dir)
        check_matches(self.manifest, config, self.dir)
        rows = [shard["rows"] for shard in self.manifest["shards"]]
        self.starts = [sum(rows[:i]) for i in range(len(rows))]  # first global row of each shard
        self.size = sum(rows)
        self._shards: dict[int, tuple] = {}  # opened per process on first use (file handles do not pickle)
        self.null_caption = read_null_caption(self.dir)  # CFG dropout's "" embedding, so T5 need not load

    def __len__(self) -> int:
        return self.size

    def __getstate__(self):
        return {**self.__dict__, "_shards": {}}

    def _shard(self, index: int):
        if index not in self._shards:
            handle = safe_open(str(self.dir / self.manifest["shards"][index]["file"]), framework="pt")
            metadata = handle.metadata()
            self._shards[index] = (handle, json.loads(metadata["captions"]),
                                   json.loads(metadata.get("image_captions", "[]")))
        return self._shards[index]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(f"CachedLatents index {index} out of range [0, {self.size})")
        shard = bisect.bisect_right(self.starts, index) - 1
        row = index - self.starts[shard]
        handle, captions, image_captions = self._shard(shard)

        def read(name: str) -> torch.Tensor:
            return handle.get_slice(name)[row:row + 1][0]

        item = {"latents": read("latents").float(), "caption_embeds": read("caption_embeds").float(),
                "caption_mask": read("caption_mask"), "label": int(read("labels")), "caption": captions[row]}
        if self.manifest["num_images"]:
            item.update(image_caption_embeds=read("image_caption_embeds").float(),
                        image_caption_mask=read("image_caption_mask"), image_captions=image_captions[row])
        return item


def write_null_caption(out: Path, text_encoder) -> None:
    """The empty caption's embedding: training replaces dropped captions by it (classifier-free guidance)."""
    if text_encoder is None:
        return
    embeddings, mask = text_encoder([""])
    temporary = out / f"{NULL_CAPTION}.tmp"
    save_file({"caption_embeds": embeddings[0].float().contiguous(), "caption_mask": mask[0].contiguous()},
              str(temporary))
    temporary.replace(out / NULL_CAPTION)


def read_null_caption(cache_dir: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    path = cache_dir / NULL_CAPTION
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor("caption_embeds"), handle.get_tensor("caption_mask")


def read_manifest(cache_dir: Path) -> dict:
    path = cache_dir / MANIFEST
    if not path.is_file():
        raise DataError(f"data.cache_dir: {cache_dir} has no {MANIFEST}; write the cache with "
                        f"`python -m ristretto.engine.cache --preset ... --out {cache_dir}`")
    manifest = json.loads(path.read_text())
    if not manifest.get("complete"):
        raise DataError(f"data.cache_dir: the cache in {cache_dir} is incomplete; rerun "
                        "`python -m ristretto.engine.cache` with the same arguments to finish it")
    return manifest


def check_matches(manifest: dict, config: RunConfig, cache_dir: Path) -> None:
    """DataError naming the first config field that differs from what the cache in `cache_dir` was written with."""
    for field, key in CHECKED_FIELDS:
        if manifest[field] != config_value(config, key):
            raise DataError(f"{key}: the cache in {cache_dir} was written with {field}={manifest[field]!r}, but the "
                            f"config has {config_value(config, key)!r}; set {key}={manifest[field]} or rebuild the cache")


# ----------------------------------------------------------------------------------------------------------- writing

class _ShardItems(Dataset):
    """Rows `indices` of the dataset, each exactly that item (centred crops) or None when it is unusable."""

    def __init__(self, dataset, indices: range):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        index = self.indices[position]
        if hasattr(self.dataset, "try_load"):
            return self.dataset.try_load(index)  # no redraw: a replacement would duplicate another row
        return self.dataset[index]


def _collate_usable(items: list):
    from .datasets import collate  # noqa: PLC0415

    usable = [item for item in items if item is not None]
    return (collate(usable) if usable else None), len(items) - len(usable)


def describe(config: RunConfig, vae, size: int, shard_size: int) -> dict:
    """manifest.json without the shard list: everything a reader checks against its config."""
    data, model = config.data, config.model
    latent = data.resolution // vae.downsample_factor
    return {"frames": data.frames, "num_images": data.num_images, "resolution": data.resolution,
            "latent_channels": vae.latent_channels,
            "latent_shape": [data.frames + data.num_images, vae.latent_channels, latent, latent],
            "caption_length": model.caption_length, "caption_channels": model.caption_channels,
            "vae": model.vae, "vae_scaling_factor": model.vae_scaling_factor, "text_encoder": model.text_encoder,
            "latent_mode": "posterior mean", "source": {"kind": data.kind, "manifest": data.manifest,
                                                        "root": data.root, "frame_stride": data.frame_stride},
            "size": size, "shard_size": shard_size}


def _write_json(path: Path, value: dict) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(value, indent=2))
    os.replace(temporary, path)


def _start_manifest(out: Path, description: dict) -> None:
    """Write manifest.json, or check that the one already there (a resumed run) describes the same cache."""
    path = out / MANIFEST
    if path.is_file():
        previous = json.loads(path.read_text())
        for key, value in description.items():
            if previous.get(key) != value:
                raise DataError(f"--out {out}: it holds a cache written with {key}={previous.get(key)!r}, now "
                                f"{value!r}; use another --out or delete it")
    _write_json(path, {**description, "complete": False})


def _check_text_encoder(text_encoder, config: RunConfig) -> None:
    embeddings, mask = text_encoder([""])
    expected = (config.model.caption_length, config.model.caption_channels)
    if tuple(embeddings.shape[1:]) != expected:
        raise DataError(f"model.caption_channels / model.caption_length: the text encoder {config.model.text_encoder!r}"
                        f" gives [L, D]={list(embeddings.shape[1:])}, the config expects {list(expected)}")


def encode_batch(batch: dict, vae, text_encoder) -> dict:
    """One collated batch -> the tensors a shard stores (bf16 latents and embeddings)."""
    embeddings, mask = text_encoder(batch["caption"])
    tensors = {"latents": vae.encode(batch["video"]).to(torch.bfloat16),
               "caption_embeds": embeddings.to(torch.bfloat16), "caption_mask": mask.bool().cpu(),
               "labels": batch["label"].to(torch.int64)}
    image_captions = batch.get("image_captions") or []
    if image_captions and image_captions[0]:
        count = len(image_captions[0])
        embeddings, mask = text_encoder([c for captions in image_captions for c in captions])
        tensors["image_caption_embeds"] = embeddings.to(torch.bfloat16).unflatten(0, (-1, count))
        tensors["image_caption_mask"] = mask.bool().cpu().unflatten(0, (-1, count))
    return {name: tensor.cpu() for name, tensor in tensors.items()}


def write_shard(path: Path, parts: list[dict], captions: list[str], image_captions: list[list[str]]) -> None:
    tensors = {name: torch.cat([part[name] for part in parts]).contiguous() for name in parts[0]}
    metadata = {"captions": json.dumps(captions), "image_captions": json.dumps(image_captions),
                "rows": str(len(captions))}
    temporary = path.with_suffix(".tmp")
    save_file(tensors, str(temporary), metadata=metadata)
    os.replace(temporary, path)  # a shard under its final name is complete: resume trusts it


def encode_shard(dataset, indices: range, vae, text_encoder, config: RunConfig, batch_size: int, path: Path):
    """Encode rows `indices` into `path`, yielding (usable, unusable) counts per batch for the progress bar."""
    loader = DataLoader(_ShardItems(dataset, indices), batch_size=batch_size, num_workers=config.data.num_workers,
                        collate_fn=_collate_usable)
    parts, captions, image_captions, bad = [], [], [], 0
    for batch, unusable in loader:
        bad += unusable
        if batch is not None:
            parts.append(encode_batch(batch, vae, text_encoder))
            captions += batch["caption"]
            image_captions += batch.get("image_captions", [[] for _ in batch["caption"]])
        yield len(batch["caption"]) if batch else 0, unusable
    if not parts or bad / len(indices) > config.data.max_bad_fraction:
        raise DataError(f"{bad} of {len(indices)} samples for {path.name} were unusable "
                        f"(> data.max_bad_fraction={config.data.max_bad_fraction}); see the warnings above")
    write_shard(path, parts, captions, image_captions)


def write_cache(config: RunConfig, out: str | Path, shard_size: int = 256, batch_size: int = 8,
                device: str = "auto", chunk_size: int = 16) -> dict:
    """Encode config's dataset into `out`; returns {"written": shards encoded now, "skipped": shards found}."""
    from .progress import progress_bar  # noqa: PLC0415

    from .datasets import build_dataset  # noqa: PLC0415
    from .text_encoder import build_text_encoder  # noqa: PLC0415
    from .vae import build_vae  # noqa: PLC0415

    if config.data.kind == "cached":
        raise DataError("data.kind: cached cannot be cached again; set data.kind to the source dataset's kind")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = build_dataset(config, augment=False)
    vae = build_vae(config.model, device, torch.bfloat16 if device == "cuda" else torch.float32, chunk_size)
    text_encoder = build_text_encoder(config.model, device)
    _check_text_encoder(text_encoder, config)
    description = describe(config, vae, len(dataset), shard_size)
    _start_manifest(out, description)
    write_null_caption(out, text_encoder)
    shards, counts = [], {"written": 0, "skipped": 0}
    with progress_bar(total=len(dataset), desc=f"caching {out}", unit="clip") as progress:
        for index, first in enumerate(range(0, len(dataset), shard_size)):
            indices, path = range(first, min(first + shard_size, len(dataset))), out / shard_name(index)
            if not path.is_file():
                for done, unusable in encode_shard(dataset, indices, vae, text_encoder, config, batch_size, path):
                    progress.update(done + unusable)
                counts["written"] += 1
            else:
                counts["skipped"] += 1
                progress.update(len(indices))
            with safe_open(str(path), framework="pt") as handle:
                shards.append({"file": path.name, "rows": int(handle.metadata()["rows"])})
    _write_json(out / MANIFEST, {**description, "shards": shards, "complete": True})
    log.info("cache %s: %d shards written, %d found from an earlier run", out, counts["written"], counts["skipped"])
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ristretto-cache", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny-t2v", help="config preset (see engine/config.py PRESETS)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set data.manifest=clips.csv (repeatable)")
    parser.add_argument("--out", required=True, help="folder to write the cache to (resumes if it exists)")
    parser.add_argument("--shard-size", type=int, default=256, help="samples per safetensors shard")
    parser.add_argument("--batch-size", type=int, default=8, help="clips encoded at once")
    parser.add_argument("--chunk-size", type=int, default=16, help="frames per VAE call")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = build_config(args.preset, args.overrides)
        write_cache(config, args.out, args.shard_size, args.batch_size, args.device, args.chunk_size)
    except ConfigError as error:  # DataError is a ConfigError: a user mistake, one line, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
