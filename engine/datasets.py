"""From config to batches: `build_dataset` picks the dataset named by data.kind, `build_loader` wraps it in a DataLoader.

Items (all kinds): "caption" str, "label" int, and either "video" [F + num_images, 3, H, W] in [-1, 1] (synthetic,
captioned, class_folders; plus "image_captions" list[str]) or, for kind=cached, "latents" [F + num_images, C, h, w],
"caption_embeds" [L, D], "caption_mask" [L] bool (plus image_* counterparts when the cache has stills).
A batch stacks every tensor along a new first dim, turns "label" into an int64 tensor and keeps strings as lists.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from .config import RunConfig
from .video_data import DataError


def build_dataset(config: RunConfig, split: str = "train", augment: bool = True) -> Dataset:
    """The dataset for data.kind. augment=False gives centred crops and fixed stills (what the cache encodes)."""
    data = config.data
    if split != "train":
        raise DataError(f"build_dataset: split {split!r} is not available; only 'train' is implemented")
    if data.kind == "synthetic":
        from .synthetic import SyntheticClips  # noqa: PLC0415 - imported lazily: its module is independent of ours

        return SyntheticClips(data.frames, data.resolution, size=data.synthetic_size, seed=config.train.seed,
                              num_images=data.num_images, entering=data.synthetic_entering,
                              size_scale=data.synthetic_size_scale, entering_epochs=data.synthetic_entering_epochs)
    if data.kind == "cached":
        from .cache import CachedLatents  # noqa: PLC0415

        if not data.cache_dir:
            raise DataError("data.cache_dir: required for data.kind=cached (a folder written by "
                            "`python -m ristretto.engine.cache`)")

        return CachedLatents(data.cache_dir, config)
    from .video_data import CaptionedVideos, ClassFolders, ImageFolder  # noqa: PLC0415 - needs PyAV

    common = dict(seed=config.train.seed, max_bad_fraction=data.max_bad_fraction, augment=augment)
    images = (ImageFolder(data.image_root, data.resolution, data.random_crop, **common)
              if data.image_root and data.num_images else None)
    clip_options = dict(frames=data.frames, resolution=data.resolution, frame_stride=data.frame_stride,
                        random_crop=data.random_crop, num_images=data.num_images, images=images, **common)
    if data.kind == "captioned":
        if not data.manifest:
            raise DataError("data.manifest: required for data.kind=captioned (a CSV or JSONL of path,caption)")
        return CaptionedVideos(data.manifest, data.root, **clip_options)
    if data.kind == "class_folders":
        if not data.root:
            raise DataError("data.root: required for data.kind=class_folders (one folder per class)")
        return ClassFolders(data.root, **clip_options)
    raise DataError(f"data.kind: got {data.kind!r}; expected synthetic, captioned, class_folders or cached")


def collate(items: list[dict]) -> dict:
    """Stack tensors, label -> int64 tensor, keep strings and lists of strings as lists."""
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], int):
            batch[key] = torch.tensor(values, dtype=torch.int64)
        else:
            batch[key] = values
    return batch


class ResumableLoader(DataLoader):
    """A DataLoader whose state_dict() is the sampler position of the batches consumed, not of those prefetched.

    With workers the DataLoader pulls indices ahead of the loop (prefetch_factor * num_workers batches), so the
    sampler's own position runs ahead; resuming from it would skip those batches. Iterate it once (the sampler is
    endless) and save loader.state_dict() in checkpoints; load_state_dict() before iterating.
    """

    def __iter__(self):
        start, consumed = self.sampler.state_dict(), 0
        self._consumed_state = start
        for batch in super().__iter__():
            consumed += self.batch_size
            self._consumed_state = self._advance(start, consumed)
            yield batch

    def _advance(self, start: dict, count: int) -> dict:
        # The ResumableSampler walks epochs of per_rank() samples each, so count samples on advance it exactly.
        position = start["position"] + count
        per_epoch = self.sampler.per_rank()
        return {"epoch": start["epoch"] + position // per_epoch, "position": position % per_epoch}

    def state_dict(self) -> dict:
        return dict(getattr(self, "_consumed_state", None) or self.sampler.state_dict())

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self._consumed_state = None


def build_loader(dataset: Dataset, batch_size: int, sampler, num_workers: int = 0, device: torch.device | str = "cpu",
                 prefetch_factor: int = 4, pin_memory: bool = True, persistent_workers: bool = True) -> ResumableLoader:
    """Batches of `dataset` in `sampler` order (an endless ResumableSampler): pinned on CUDA (when pin_memory) so the
    step's copies are asynchronous; with workers, each loads prefetch_factor batches ahead and stays alive."""
    workers = num_workers > 0
    return ResumableLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                           collate_fn=collate, pin_memory=pin_memory and torch.device(device).type == "cuda",
                           persistent_workers=persistent_workers and workers,
                           prefetch_factor=prefetch_factor if workers else None, drop_last=True)


def loader_for(config: RunConfig, dataset: Dataset, sampler, device) -> ResumableLoader:
    """build_loader with the data.* loader settings of `config`."""
    data = config.data
    return build_loader(dataset, config.train.batch_size, sampler, data.num_workers, device, data.prefetch_factor,
                        data.pin_memory, data.persistent_workers)
