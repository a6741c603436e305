"""Synthetic captioned clips (what `python train.py` trains on by default) and a scorer that reads what a video shows.

Grammar: "a <colour> <shape> moving <direction>", e.g. "a red circle moving left" (6 x 3 x 4 = 72 captions). A clip is
one anti-aliased object of that colour and shape on black, moving in a straight line in that direction at a random
speed from a random start, fully in view.

The scorer needs no model: it keeps the colourful pixels (chroma = max - min channel, so grey noise and black drop
out), classifies each by the nearest palette colour after removing its grey part and brightness (so blur, which
only mixes the object with black, keeps its class), takes the chroma-weighted majority as the colour, tracks that
colour's centroid over frames, and reads the direction from a least-squares fit of the centroid's path. Shape: per
frame, each shape is rendered with the object's area and centroid and the closest fit to its mask gets the vote.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (255, 0, 0)),
    ("yellow", (255, 255, 0)),
    ("green", (0, 255, 0)),
    ("cyan", (0, 255, 255)),
    ("blue", (0, 0, 255)),
    ("magenta", (255, 0, 255)),
)
"""(name, RGB): the six hues 60 degrees apart, fully saturated, so blur and codec loss keep them apart."""
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
COLOUR_NAMES = tuple(name for name, _ in COLOURS)
NUM_CLASSES = len(COLOURS)

# Unit displacement per direction in image coordinates (x right, y down).
_DIRECTION_VECTORS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
_SIZE_RANGE = (0.15, 0.22)  # object half-size as a fraction of the resolution: 4.8-7 px at 32, 2.4-3.5 px at 16
_SPEED_RANGE = (1.5, 3.0)  # px per frame at 32 px, scaled with the resolution
_SUPERSAMPLE = 4  # sub-pixels per pixel side: soft edges keep small shapes recognisable at 16 px


# ---------------------------------------------------------------------------------------------------------- grammar

def caption_for(colour: str, shape: str, direction: str) -> str:
    return f"a {colour} {shape} moving {direction}"


def parse_caption(caption: str) -> tuple[str, str, str]:
    """(colour, shape, direction) of a grammar caption; ValueError naming the caption otherwise."""
    words = caption.strip().lower().split()
    if (len(words) != 5 or words[0] != "a" or words[3] != "moving" or words[1] not in COLOUR_NAMES
            or words[2] not in SHAPES or words[4] not in DIRECTIONS):
        raise ValueError(f"caption {caption!r} is not in the synthetic grammar: expected 'a <colour> <shape> moving "
                         f"<direction>' with colour in {COLOUR_NAMES}, shape in {SHAPES}, direction in {DIRECTIONS}")
    return words[1], words[2], words[4]


def all_captions() -> list[str]:
    return [caption_for(c, s, d) for c in COLOUR_NAMES for s in SHAPES for d in DIRECTIONS]


def class_names() -> list[str]:
    """Class index -> name for class-conditional training (the classes are the colours)."""
    return list(COLOUR_NAMES)


def split_captions(seed: int = 0, holdout: str = "colour-direction") -> tuple[list[str], list[str]]:
    """(train, held-out) captions; held-out combinations never occur in training, yet every word does.

    holdout="colour-direction" (default): 4 (colour, direction) pairs, each with a different colour and a different
    direction, are held out with all 3 shapes (12 of 72 captions, 17%). The model never sees e.g. "red ... moving
    left", so the scorer's colour and direction accuracy on held-out captions measure composition, not recall.
    holdout="triple": 12 (colour, shape, direction) triples, chosen so every pair of words still occurs in training.
    """
    generator = torch.Generator().manual_seed(seed)
    if holdout == "colour-direction":
        colours = [COLOUR_NAMES[i] for i in torch.randperm(len(COLOUR_NAMES), generator=generator)]
        directions = [DIRECTIONS[i] for i in torch.randperm(len(DIRECTIONS), generator=generator)]
        pairs = set(zip(colours, directions))
        heldout = {caption_for(c, s, d) for c, d in pairs for s in SHAPES}
    elif holdout == "triple":
        heldout = _heldout_triples(generator, count=12)
    else:
        raise ValueError(f"split_captions: holdout={holdout!r}; expected 'colour-direction' or 'triple'")
    captions = all_captions()
    return [c for c in captions if c not in heldout], [c for c in captions if c in heldout]


def _heldout_triples(generator: torch.Generator, count: int) -> set[str]:
    """Greedy over a seeded order: hold a triple out only while each of its word pairs keeps a training caption."""
    captions = all_captions()
    remaining = {}  # word pair -> training captions that still contain it
    for caption in captions:
        for pair in _word_pairs(caption):
            remaining[pair] = remaining.get(pair, 0) + 1
    heldout = set()
    for index in torch.randperm(len(captions), generator=generator).tolist():
        pairs = _word_pairs(captions[index])
        if len(heldout) < count and all(remaining[p] > 1 for p in pairs):
            heldout.add(captions[index])
            for pair in pairs:
                remaining[pair] -= 1
    return heldout


def _word_pairs(caption: str) -> list[tuple[str, str]]:
    colour, shape, direction = parse_caption(caption)
    return [(colour, shape), (colour, direction), (shape, direction)]


# --------------------------------------------------------------------------------------------------------- rendering

def render_clip(caption: str, frames: int, resolution: int, generator: torch.Generator,
                entering: bool = False, size_scale: float = 1.0) -> torch.Tensor:
    """[frames, 3, H, W] in [-1, 1]: the caption's object on black, moving its way; deterministic given `generator`.
    entering=True: the object starts at the edge it moves away from, centred across, at top speed (one trajectory
    per direction and size, instead of a random start and speed). size_scale multiplies the object's size range."""
    colour, shape, direction = parse_caption(caption)
    half = resolution * size_scale * _uniform(generator, *_SIZE_RANGE)
    if 2 * half >= resolution:
        raise ValueError(f"render_clip: size_scale={size_scale} makes the object ({2 * half:.1f} px) as wide as the "
                         f"frame ({resolution} px)")
    room = resolution - 2 * half  # span the centre may cover with the whole object in view
    speed = resolution / 32 * (_SPEED_RANGE[1] if entering else _uniform(generator, *_SPEED_RANGE))
    travel = min(speed * (frames - 1), room)
    if entering:
        along, across = half, resolution / 2
    else:
        along, across = _uniform(generator, 0, room - travel) + half, _uniform(generator, 0, room) + half
    steps = np.arange(frames) * (travel / max(frames - 1, 1))
    dx, dy = _DIRECTION_VECTORS[direction]
    if dx:  # `along` is measured from the edge the object moves away from
        xs = (along + steps) if dx > 0 else (resolution - along - steps)
        ys = np.full_like(xs, across)
    else:
        ys = (along + steps) if dy > 0 else (resolution - along - steps)
        xs = np.full_like(ys, across)
    coverage = torch.from_numpy(_shape_coverage(shape, xs, ys, half, resolution))  # [F, H, W] in [0, 1]
    rgb = torch.tensor(dict(COLOURS)[colour], dtype=torch.float32) / 255.0
    return coverage[:, None] * rgb[None, :, None, None] * 2.0 - 1.0


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator, dtype=torch.float64).item()


def _shape_coverage(shape: str, xs: np.ndarray, ys: np.ndarray, half, resolution: int) -> np.ndarray:
    """Fraction of each pixel the shape covers, per frame: [F, H, W] float32 (sub-pixel sampling, then averaging).

    xs, ys: [F] centres; half: the half-size, one float or [F]. NumPy, single-threaded: the scorer calls this for
    every frame it reads, and small multi-threaded torch ops stall on the shared CPUs.
    """
    grid = (np.arange(resolution * _SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
    u = grid[None, None, :] - np.asarray(xs, np.float64)[:, None, None]  # [F, 1, W*s] offset from the centre
    v = grid[None, :, None] - np.asarray(ys, np.float64)[:, None, None]  # [F, H*s, 1]
    half = np.broadcast_to(np.asarray(half, np.float64), u.shape[:1])[:, None, None]
    if shape == "circle":
        inside = u**2 + v**2 <= half**2
    elif shape == "square":
        inside = (np.abs(u) <= half) & (np.abs(v) <= half)
    else:  # triangle pointing up: apex at (0, -half), base from (-half, half) to (half, half)
        inside = (v <= half) & (2 * np.abs(u) <= v + half)
    s = _SUPERSAMPLE
    return inside.reshape(len(u), resolution, s, resolution, s).mean(axis=(2, 4), dtype=np.float32)


# ----------------------------------------------------------------------------------------------------------- dataset

class SyntheticClips(Dataset):
    """`size` seeded clips; item i is the same for the same (seed, i), whatever was read before (resume relies on it).

    Each item: {"video": [frames + num_images, 3, H, W] in [-1, 1], "caption", "label" (colour index),
    "image_captions"}: the extra frames are stills of other random clips, each with its own caption (joint training).
    """

    def __init__(self, frames: int, resolution: int, size: int = 4096, seed: int = 0,
                 captions: list[str] | None = None, num_images: int = 0, entering: bool = False,
                 size_scale: float = 1.0, entering_epochs: int = 0):
        self.frames, self.resolution, self.size, self.seed, self.num_images = frames, resolution, size, seed, num_images
        self.entering, self.size_scale = entering, size_scale  # see render_clip
        # A curriculum: objects enter from the edge in the first `entering_epochs` passes, then start anywhere. The
        # sampler then tags each index with its pass (index + epoch * size), so a resumed run sees the same clips.
        self.entering_epochs = entering_epochs
        self.epoch_tagged_indices = entering_epochs > 0
        self.captions = list(captions) if captions is not None else split_captions()[0]
        if not self.captions:
            raise ValueError("SyntheticClips: no captions to draw from (captions=[])")
        for caption in self.captions:
            parse_caption(caption)  # fail at construction on a caption outside the grammar

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        epoch, index = divmod(index, self.size) if self.epoch_tagged_indices and index >= 0 else (0, index)
        if not 0 <= index < self.size:
            raise IndexError(f"SyntheticClips index {index} out of range [0, {self.size})")
        # torch's CPU generator keeps only a seed's low 32 bits: pack (seed, index) into them, unique below 1e6 items.
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + index) % 2**32)
        caption = self._draw_caption(generator)
        entering = self.entering or epoch < self.entering_epochs
        video = render_clip(caption, self.frames, self.resolution, generator, entering, self.size_scale)
        image_captions = [self._draw_caption(generator) for _ in range(self.num_images)]
        stills = [render_clip(c, 1, self.resolution, generator, size_scale=self.size_scale) for c in image_captions]
        return {"video": torch.cat([video, *stills]), "caption": caption,
                "label": COLOUR_NAMES.index(parse_caption(caption)[0]), "image_captions": image_captions}

    def _draw_caption(self, generator: torch.Generator) -> str:
        return self.captions[torch.randint(len(self.captions), (), generator=generator).item()]


# ------------------------------------------------------------------------------------------------------------ scorer

_PALETTE_DIRECTIONS = None  # [K, 3] palette colours with grey removed and scaled to max 1 (filled on first use)
_MIN_CHROMA = 0.2  # pixels less colourful than this (in [0, 1] units) are background or noise
_RELATIVE_CHROMA = 0.4  # ... and so are those below this fraction of the clip's most colourful pixels


def _hue_directions(rgb: np.ndarray) -> np.ndarray:
    """Remove the grey part (min channel) and the brightness (scale max to 1): what blur toward black keeps."""
    chroma = rgb.max(axis=-1, keepdims=True) - rgb.min(axis=-1, keepdims=True)
    return (rgb - rgb.min(axis=-1, keepdims=True)) / np.maximum(chroma, 1e-6)


def _palette_directions() -> np.ndarray:
    global _PALETTE_DIRECTIONS
    if _PALETTE_DIRECTIONS is None:
        _PALETTE_DIRECTIONS = _hue_directions(np.array([rgb for _, rgb in COLOURS], dtype=np.float32) / 255.0)
    return _PALETTE_DIRECTIONS


def score_video(video) -> dict:
    """What a video [F, 3, H, W] in [-1, 1] (tensor or array) shows: {"colour", "direction", "shape"}, None if unsure."""
    rgb = _to_rgb01(video)  # [F, H, W, 3]
    chroma = rgb.max(axis=-1) - rgb.min(axis=-1)  # [F, H, W]
    peak = np.quantile(chroma, 0.999)
    candidate = chroma >= max(_MIN_CHROMA, _RELATIVE_CHROMA * peak)
    if not candidate.any():
        return {"colour": None, "direction": None, "shape": None}
    distances = ((_hue_directions(rgb[candidate])[:, None] - _palette_directions()[None]) ** 2).sum(-1)
    classes = distances.argmin(axis=1)
    votes = np.bincount(classes, weights=chroma[candidate], minlength=len(COLOURS))
    dominant = int(votes.argmax())
    mask = np.zeros_like(candidate)
    mask[candidate] = classes == dominant
    weights = np.where(mask, chroma, 0.0)  # [F, H, W]: the object's pixels, weighted by how colourful they are
    return {"colour": COLOUR_NAMES[dominant], "direction": _direction(weights), "shape": _shape(weights, mask)}


def _to_rgb01(video) -> np.ndarray:
    array = video.detach().float().cpu().numpy() if isinstance(video, torch.Tensor) else np.asarray(video, np.float32)
    if array.ndim != 4 or array.shape[1] != 3:
        raise ValueError(f"score_video: expected a video [F, 3, H, W] in [-1, 1], got shape {tuple(array.shape)}")
    return np.clip((array.transpose(0, 2, 3, 1) + 1.0) / 2.0, 0.0, 1.0)


def _direction(weights: np.ndarray) -> str | None:
    """Least-squares slope of the weighted centroid over the frames that show the object; None without motion."""
    mass = weights.sum(axis=(1, 2))
    shown = mass > 0
    if shown.sum() < 2:
        return None
    ys, xs = np.arange(weights.shape[1]) + 0.5, np.arange(weights.shape[2]) + 0.5
    cx = (weights.sum(axis=1) * xs).sum(axis=1)[shown] / mass[shown]
    cy = (weights.sum(axis=2) * ys).sum(axis=1)[shown] / mass[shown]
    t = np.flatnonzero(shown).astype(np.float64)
    centred = t - t.mean()
    span_per_slope = (t.max() - t.min()) / (centred**2).sum()  # least-squares slope, times the time span
    dx, dy = (centred * cx).sum() * span_per_slope, (centred * cy).sum() * span_per_slope
    if max(abs(dx), abs(dy)) < 0.5:  # under half a pixel over the clip: no motion to read
        return None
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


# Area of each shape per squared half-size, and how far its centroid sits below its box centre (in half-sizes).
_AREA_PER_HALF_SQUARED = {"circle": math.pi, "square": 4.0, "triangle": 2.0}
_CENTROID_DROP = {"circle": 0.0, "square": 0.0, "triangle": 1.0 / 3.0}


def _shape(weights: np.ndarray, mask: np.ndarray) -> str | None:
    """Majority over frames of the shape whose rendering, matched in area and centroid, best fits the object's mask."""
    peak = np.quantile(weights[mask], 0.9) if mask.any() else 0.0
    coverage = np.clip(weights / max(peak, 1e-6), 0.0, 1.0)  # [F, H, W]
    area = coverage.sum(axis=(1, 2))
    coverage, area = coverage[area >= 2.0], area[area >= 2.0]  # frames that show a few pixels of the object
    if not len(area):
        return None
    resolution = weights.shape[1]
    grid = np.arange(resolution) + 0.5
    cx = (coverage.sum(axis=1) * grid).sum(axis=1) / area
    cy = (coverage.sum(axis=2) * grid).sum(axis=1) / area
    errors = []
    for shape in SHAPES:
        half = np.sqrt(area / _AREA_PER_HALF_SQUARED[shape])
        template = _shape_coverage(shape, cx, cy - _CENTROID_DROP[shape] * half, half, resolution)
        errors.append(np.abs(template - coverage).sum(axis=(1, 2)))
    votes = np.bincount(np.argmin(errors, axis=0), minlength=len(SHAPES))
    return SHAPES[int(votes.argmax())]


def score_against_captions(videos, captions: list[str]) -> dict:
    """Fraction of videos whose scored colour, direction and shape match their captions."""
    if len(videos) != len(captions):
        raise ValueError(f"score_against_captions: {len(videos)} videos but {len(captions)} captions")
    hits = np.zeros(3)
    for video, caption in zip(videos, captions):
        expected = parse_caption(caption)
        scored = score_video(video)
        hits += [scored["colour"] == expected[0], scored["direction"] == expected[2], scored["shape"] == expected[1]]
    n = max(len(captions), 1)
    return {"colour_accuracy": hits[0] / n, "direction_accuracy": hits[1] / n, "shape_accuracy": hits[2] / n,
            "n": len(captions)}


# --------------------------------------------------------------------------------------------------------------- I/O

def load_video(path: str | Path) -> torch.Tensor:
    """Frames of an .mp4 (PyAV) or .gif (Pillow) file as [F, 3, H, W] float in [-1, 1]."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_video: no file at {path}")
    frames = _read_gif(path) if path.suffix.lower() == ".gif" else _read_with_av(path)
    if not frames:
        raise ValueError(f"load_video: {path} has no video frames")
    array = np.stack(frames).astype(np.float32)  # [F, H, W, 3] uint8 values
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def _read_gif(path: Path) -> list[np.ndarray]:
    from PIL import Image, ImageSequence  # noqa: PLC0415 - only needed for gifs

    with Image.open(path) as image:
        return [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(image)]


def _read_with_av(path: Path) -> list[np.ndarray]:
    try:
        import av  # noqa: PLC0415 - optional dependency (extra [video])
    except ImportError:
        raise ImportError(f"load_video: reading {path.suffix} files needs PyAV: pip install av") from None
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
