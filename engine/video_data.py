"""Real video datasets: captioned clips from a manifest, UCF-101-style class folders, and joint image+video stills.

Every dataset returns the synthetic dataset's item: {"video": [frames + num_images, 3, H, W] float in [-1, 1],
"caption": str, "label": int, "image_captions": list[str]}.

Decoding uses PyAV: seek to the clip's (random) start, decode `frames` frames `frame_stride` apart, let swscale
resize the short side to `resolution` and crop a square (random or centre). Randomness: with `augment=True` each
item draws a fresh seed from torch's global RNG (which DataLoader seeds per worker), so crops differ across epochs;
with `augment=False` (the encoder cache) the temporal and spatial crops are centred and the stills are a function of
(seed, index), so an item is the same every time it is read.

Bad input (missing, unreadable, corrupt or too-short video, empty caption, broken image) raises `BadSample` inside
`load`; `__getitems__` counts it, logs the path once, and draws a replacement index deterministically from
(seed, index, attempt). When more than `max_bad_fraction` of the draws for one batch (or one item, through
`__getitem__`) fail, it raises `DataError`.

Manifests (CSV with a header row, or JSONL with one object per line; UTF-8 with or without a byte-order mark): columns
`path` and `caption` (strings) are required; `start` and `end` (finite seconds >= 0, a window inside the video) and
`label` (int >= 0) are optional. A bad row is a DataError naming the manifest and line. `path` is relative to `root`
(or to the manifest's folder when `root` is empty).

Image folder for joint training (`image_root`): images (.jpg .jpeg .png .webp .bmp) anywhere under the folder. An
optional `captions.csv` or `captions.jsonl` in the folder, in the manifest format (`path,caption`, paths relative
to `image_root`), lists the images to use and their captions; without it every image is used and its caption is the
file name's stem with `_` and `-` read as spaces ("a_red_car.jpg" -> "a red car").
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .config import ConfigError

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".gif")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
IMAGE_CAPTION_FILES = ("captions.csv", "captions.jsonl")


class DataError(ConfigError):
    """A user-side data problem (bad manifest, missing folder, too many unreadable files): one line naming it."""


class BadSample(Exception):
    """One sample cannot be used (missing/corrupt/too-short file, empty caption); the dataset draws another."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


@dataclass(frozen=True)
class ClipEntry:
    """One row of a manifest or one file of a class folder."""
    path: str
    caption: str
    label: int = 0
    start: float | None = None
    end: float | None = None


# --------------------------------------------------------------------------------------------------------- manifests

def read_manifest(manifest: str | Path, root: str | Path = "") -> list[ClipEntry]:
    """Rows of a CSV/JSONL manifest as ClipEntry with absolute paths; DataError naming file:line on a bad row."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise DataError(f"data.manifest: {manifest} does not exist")
    base = Path(root) if root else manifest.parent
    if not base.is_dir():
        raise DataError(f"data.root: folder {base} does not exist (needed by {manifest})")
    rows = _jsonl_rows(manifest) if manifest.suffix.lower() in (".jsonl", ".json") else _csv_rows(manifest)
    entries = [_entry(row, line, manifest, base) for line, row in rows]
    if not entries:
        raise DataError(f"{manifest}: the manifest has no rows")
    return entries


def read_text(manifest: Path) -> str:
    """The manifest's text: UTF-8, with or without a byte-order mark; DataError naming the line of a bad byte."""
    raw = manifest.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        raise DataError(f"{manifest}:{line}: not UTF-8 text (byte 0x{raw[error.start]:02x}); save the manifest as "
                        f"UTF-8") from None


def _csv_rows(manifest: Path):
    reader = csv.DictReader(io.StringIO(read_text(manifest), newline=""))
    try:
        missing = [c for c in ("path", "caption") if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{manifest}:1: header lacks column {missing[0]!r} (expected path,caption[,start,end])")
        for row in reader:
            yield reader.line_num, row
    except csv.Error as error:
        raise DataError(f"{manifest}:{reader.line_num}: not valid CSV ({error})") from None


def _jsonl_rows(manifest: Path):
    for line, text in enumerate(read_text(manifest).splitlines(), start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{manifest}:{line}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{manifest}:{line}: expected a JSON object with keys path and caption")
        yield line, row


def _seconds(row: dict, key: str, where: str) -> float | None:
    value = row.get(key)
    if value in (None, ""):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DataError(f"{where}: {key} must be a number of seconds, got {json.dumps(value)}")
    try:
        seconds = float(value)
    except ValueError:
        raise DataError(f"{where}: {key} must be a number of seconds, got {value!r}") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise DataError(f"{where}: {key} must be a finite number of seconds >= 0, got {value!r}")
    return seconds


def _label(row: dict, where: str) -> int:
    value = row.get("label")
    if value in (None, ""):
        return 0
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().lstrip("-").isdigit():
        raise DataError(f"{where}: label must be a class index (an int >= 0), got {json.dumps(value)}")
    if int(value) < 0:
        raise DataError(f"{where}: label must be a class index (an int >= 0), got {value}")
    return int(value)


def _entry(row: dict, line: int, manifest: Path, base: Path) -> ClipEntry:
    where = f"{manifest}:{line}"
    for column in ("path", "caption"):
        if row.get(column) is None:
            raise DataError(f"{where}: missing {column!r} (expected path,caption[,start,end])")
    if not isinstance(row["path"], str) or not row["path"].strip():
        raise DataError(f"{where}: path must be a non-empty string, got {json.dumps(row['path'])}")
    if not isinstance(row["caption"], str):
        raise DataError(f"{where}: caption must be a string, got {json.dumps(row['caption'])}")
    start, end, label = _seconds(row, "start", where), _seconds(row, "end", where), _label(row, where)
    if start is not None and end is not None and end <= start:
        raise DataError(f"{where}: end ({end}) must be after start ({start})")
    return ClipEntry(str(base / row["path"]), row["caption"].strip(), label, start, end)


# ---------------------------------------------------------------------------------------------------------- decoding

def read_clip(entry: ClipEntry, frames: int, stride: int, resolution: int, rng: random.Random | None,
              random_crop: bool) -> torch.Tensor:
    """[frames, 3, res, res] uint8 from the entry's window; rng=None takes the centred temporal crop."""
    import av  # noqa: PLC0415 - the [video] extra, needed only for real videos

    if not Path(entry.path).is_file():
        raise BadSample(entry.path, "missing file")
    span = (frames - 1) * stride + 1  # decoded frames one sample covers
    try:
        with av.open(entry.path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # frame + slice threads: decoding is the data loader's hot loop
            rate = float(stream.average_rate or stream.guessed_rate or 0)
            if rate <= 0:
                raise BadSample(entry.path, "unknown frame rate")
            start = entry.start or 0.0
            end = entry.end if entry.end is not None else _duration(container, stream)
            # Unknown length: read from the start (no temporal crop); too short shows after decoding.
            available = math.floor((end - start) * rate + 1e-3) if math.isfinite(end) else span
            if available < span:
                raise BadSample(entry.path, f"too short: {available} frames in [{start:g}, {end:g}] s, need {span}")
            offset = rng.randint(0, available - span) if rng else (available - span) // 2
            first = start + offset / rate
            container.seek(int(first / stream.time_base), stream=stream, backward=True, any_frame=False)
            decoded = _decode_from(container, stream, first - 0.5 / rate, span)
    except av.FFmpegError as error:
        raise BadSample(entry.path, f"unreadable ({type(error).__name__}: {error})") from None
    except IndexError:
        raise BadSample(entry.path, "no video stream") from None
    if len(decoded) < span:
        raise BadSample(entry.path, f"too short: decoded {len(decoded)} frames from {first:.3f} s, need {span}")
    return frames_to_tensor(decoded[::stride], resolution, rng, random_crop)


def _duration(container, stream) -> float:
    if stream.duration:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / 1_000_000  # av.time_base: microseconds
    return math.inf  # unknown: decode until the stream ends; too-short is caught after decoding


def _decode_from(container, stream, first: float, count: int) -> list:
    """`count` consecutive frames whose time is at or after `first` (the seek lands on the keyframe before it)."""
    frames = []
    for frame in container.decode(stream):
        if frame.time is not None and frame.time < first:
            continue
        frames.append(frame)
        if len(frames) == count:
            break
    return frames


def frames_to_tensor(frames: list, resolution: int, rng: random.Random | None, random_crop: bool) -> torch.Tensor:
    """PyAV frames or PIL images -> [N, 3, res, res] uint8: short side resized to `res`, one crop for all frames."""
    width, height = frames[0].width, frames[0].height
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    left, top = _crop_offset(size[0] - resolution, rng, random_crop), _crop_offset(size[1] - resolution, rng, random_crop)
    arrays = [_resized_rgb(frame, size)[top:top + resolution, left:left + resolution] for frame in frames]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _crop_offset(slack: int, rng: random.Random | None, random_crop: bool) -> int:
    return rng.randint(0, slack) if (rng and random_crop) else slack // 2


def _resized_rgb(frame, size: tuple[int, int]) -> np.ndarray:
    if hasattr(frame, "to_ndarray"):  # a PyAV frame: swscale resizes while converting to RGB
        return frame.to_ndarray(format="rgb24", width=size[0], height=size[1], interpolation="AREA")
    from PIL import Image  # noqa: PLC0415

    return np.asarray(frame.convert("RGB").resize(size, Image.Resampling.BICUBIC))


def to_unit_range(video: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return video.float().div_(127.5).sub_(1.0)


def read_image(path: str, resolution: int, rng: random.Random | None, random_crop: bool) -> torch.Tensor:
    """[1, 3, res, res] uint8 from an image file; BadSample when it is missing or unreadable."""
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    try:
        with Image.open(path) as image:
            image.load()
            return frames_to_tensor([image], resolution, rng, random_crop)
    except FileNotFoundError:
        raise BadSample(path, "missing file") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise BadSample(path, f"unreadable image ({error})") from None


# ---------------------------------------------------------------------------------------------- skipping bad samples

class DrawBudget:
    """Counts failed draws for `needed` good samples; raises once more than `max_fraction` of all draws must fail."""

    def __init__(self, needed: int, max_fraction: float, what: str):
        self.needed, self.max_fraction, self.what, self.failed = needed, max_fraction, what, 0

    def fail(self, bad: BadSample) -> None:
        self.failed += 1
        # Draws end at needed + failed (each good sample is one draw), so this fraction only grows from here.
        fraction = self.failed / (self.needed + self.failed)
        if fraction > self.max_fraction:
            raise DataError(f"{self.failed} of {self.needed + self.failed} draws for {self.what} were unusable "
                            f"(> data.max_bad_fraction={self.max_fraction}); last: {bad}")


class SkippingDataset(Dataset):
    """Base for file-backed datasets over `self.entries` (ClipEntry): `load(index, rng)` may raise BadSample; reads
    skip and redraw such samples."""

    def __init__(self, seed: int, max_bad_fraction: float, augment: bool):
        self.seed, self.max_bad_fraction, self.augment = seed, max_bad_fraction, augment
        self.bad_draws = 0  # per process: each DataLoader worker counts its own
        self.bad_paths: dict[str, str] = {}  # path -> reason, logged once per path

    entries: list  # ClipEntry per item, set by the subclass
    # Indices may carry the epoch (ResumableSampler(tag_epochs=True)): augmentation is then a pure function of
    # (seed, epoch, index), the same in every worker and after a resume.
    epoch_tagged_indices = True

    def __len__(self) -> int:
        return len(self.entries)

    def captioned_entry(self, index: int):
        """The item's entry; an empty caption makes it a bad sample (nothing to condition on)."""
        entry = self.entries[index]
        if not entry.caption:
            raise BadSample(entry.path, "empty caption")
        return entry

    def load(self, index: int, rng: random.Random | None) -> dict:
        raise NotImplementedError

    def record_bad(self, bad: BadSample) -> None:
        self.bad_draws += 1
        if bad.path not in self.bad_paths:
            self.bad_paths[bad.path] = bad.reason
            log.warning("skipping %s: %s (%d bad draws so far)", bad.path, bad.reason, self.bad_draws)

    def item_rng(self, index: int, epoch: int = 0) -> random.Random | None:
        """The item's randomness when augmenting, keyed by (seed, epoch, index); none (centred crops) otherwise."""
        return random.Random(f"{self.seed}:{epoch}:{index}") if self.augment else None

    def redraw(self, index: int, attempt: int, size: int) -> int:
        """The attempt-th candidate for slot `index`: itself first, then a deterministic function of (seed, index)."""
        if attempt == 0:
            return index
        return random.Random(f"{self.seed}:{index}:{attempt}").randrange(size)

    def draw(self, index: int, budget: DrawBudget, load=None, size: int | None = None, epoch: int = 0) -> dict:
        """Load slot `index` (of `size`, default len(self)), redrawing on BadSample until one loads or the budget is
        spent (max_bad_fraction >= 1 never spends it, so the draws are capped too)."""
        load = load or (lambda candidate: self.load(candidate, self.item_rng(candidate, epoch)))
        size = size or len(self)
        for attempt in range(10 * size + 1):
            try:
                return load(self.redraw(index, attempt, size))
            except BadSample as bad:
                self.record_bad(bad)
                budget.fail(bad)
        raise DataError(f"no usable sample found for index {index} after {10 * size + 1} draws")

    def __getitems__(self, indices: list[int]) -> list[dict]:
        # DataLoader calls this with a whole batch, so max_bad_fraction applies per batch.
        budget = DrawBudget(len(indices), self.max_bad_fraction, f"a batch of {len(indices)}")
        return [self.draw(index % len(self), budget, epoch=index // len(self)) for index in indices]

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def try_load(self, index: int) -> dict | None:
        """Exactly item `index` with centred crops, or None (counted and logged) when it is bad: for the cache."""
        try:
            return self.load(index, None)
        except BadSample as bad:
            self.record_bad(bad)
            return None


# ------------------------------------------------------------------------------------------------------------ images

class ImageFolder(SkippingDataset):
    """Captioned stills for joint training (format in the module docstring); items are [1, 3, res, res] uint8."""

    def __init__(self, image_root: str | Path, resolution: int, random_crop: bool = True, seed: int = 0,
                 max_bad_fraction: float = 0.5, augment: bool = True):
        super().__init__(seed, max_bad_fraction, augment)
        self.root, self.resolution, self.random_crop = Path(image_root), resolution, random_crop
        if not self.root.is_dir():
            raise DataError(f"data.image_root: folder {self.root} does not exist")
        self.entries = self._listed_images() or self._all_images()
        if not self.entries:
            raise DataError(f"data.image_root: no images ({', '.join(IMAGE_SUFFIXES)}) under {self.root}")

    def _listed_images(self) -> list[ClipEntry]:
        for name in IMAGE_CAPTION_FILES:
            if (self.root / name).is_file():
                return read_manifest(self.root / name, self.root)
        return []

    def _all_images(self) -> list[ClipEntry]:
        paths = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        return [ClipEntry(str(p), p.stem.replace("_", " ").replace("-", " ").strip()) for p in paths]

    def load(self, index: int, rng: random.Random | None) -> dict:
        entry = self.captioned_entry(index)
        return {"image": read_image(entry.path, self.resolution, rng, self.random_crop), "caption": entry.caption}


# ------------------------------------------------------------------------------------------------------------ videos

class VideoClips(SkippingDataset):
    """Clips of a list of ClipEntry, plus `num_images` captioned stills (from `images`, else from other clips)."""

    def __init__(self, entries: list[ClipEntry], frames: int, resolution: int, frame_stride: int = 1,
                 random_crop: bool = True, num_images: int = 0, images: ImageFolder | None = None, seed: int = 0,
                 max_bad_fraction: float = 0.5, augment: bool = True):
        super().__init__(seed, max_bad_fraction, augment)
        self.entries, self.frames, self.resolution, self.frame_stride = entries, frames, resolution, frame_stride
        self.random_crop, self.num_images, self.images = random_crop, num_images, images

    def load(self, index: int, rng: random.Random | None) -> dict:
        entry = self.captioned_entry(index)
        clip = read_clip(entry, self.frames, self.frame_stride, self.resolution, rng, self.random_crop)
        stills, image_captions = self.stills(index, rng)
        return {"video": to_unit_range(torch.cat([clip, *stills])), "caption": entry.caption, "label": entry.label,
                "image_captions": image_captions}

    def stills(self, index: int, rng: random.Random | None) -> tuple[list[torch.Tensor], list[str]]:
        """num_images captioned [1, 3, res, res] uint8 stills, drawn from the image folder or from other videos."""
        if not self.num_images:
            return [], []
        pick = rng or random.Random(f"stills:{self.seed}:{index}")
        source = self.images or self
        budget = DrawBudget(self.num_images, self.max_bad_fraction, f"the {self.num_images} stills of item {index}")
        stills = [self.draw(pick.randrange(len(source)), budget, lambda i: self._still(source, i, pick), len(source))
                  for _ in range(self.num_images)]
        return [s["image"] for s in stills], [s["caption"] for s in stills]

    def _still(self, source: SkippingDataset, index: int, rng: random.Random) -> dict:
        if source is not self:
            return source.load(index, rng if self.augment else None)
        entry = self.captioned_entry(index)
        frame = read_clip(entry, 1, 1, self.resolution, rng, self.random_crop and self.augment)
        return {"image": frame, "caption": entry.caption}


class CaptionedVideos(VideoClips):
    """Videos listed in a CSV/JSONL manifest (path,caption[,start,end][,label]) under `root`."""

    def __init__(self, manifest: str | Path, root: str | Path = "", **clip_options):
        super().__init__(read_manifest(manifest, root), **clip_options)


class ClassFolders(VideoClips):
    """UCF-101 layout: root/<ClassName>/<video>; label = index of the class in sorted folder names, caption = name."""

    def __init__(self, root: str | Path, **clip_options):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"data.root: folder {root} does not exist")
        self.classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        entries = [ClipEntry(str(path), name, label)
                   for label, name in enumerate(self.classes)
                   for path in sorted((root / name).rglob("*")) if path.suffix.lower() in VIDEO_SUFFIXES]
        if not entries:
            raise DataError(f"data.root: no videos ({', '.join(VIDEO_SUFFIXES)}) in class folders under {root}")
        super().__init__(entries, **clip_options)
