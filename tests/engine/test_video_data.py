"""Real-video datasets: decoding, frame sampling, crops, bad-input skipping, manifests, class folders, joint images,
build_dataset / build_loader and sampler resume. Tiny lossless mp4s are written to tmp_path (frame i = grey level(i))."""
import json
import logging
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("av")
sys.path.insert(0, str(Path(__file__).parent))
import media_fixtures as media  # noqa: E402

from ristretto.engine.config import build_config  # noqa: E402
from ristretto.engine.datasets import build_dataset, build_loader, collate  # noqa: E402
from ristretto.engine.sampler import ResumableSampler  # noqa: E402
from ristretto.engine.video_data import (CaptionedVideos, ClassFolders, DataError, ImageFolder,  # noqa: E402
                                         frames_to_tensor)

CLIP = dict(frames=4, resolution=16, frame_stride=2)
GREY_TOLERANCE = 3 / 127.5  # lossless H.264 in yuv420p still rounds RGB -> YUV -> RGB by a level or two


def grey(level: int) -> float:
    return level / 127.5 - 1


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("videos")
    media.write_video(folder / "long.mp4", 24)
    media.write_video(folder / "other.mp4", 16, width=40, height=48)
    media.write_video(folder / "short.mp4", 3)
    media.write_corrupt(folder / "corrupt.mp4")
    return folder


def write_csv(path: Path, rows: list[tuple], header="path,caption") -> Path:
    path.write_text("\n".join([header, *(",".join(map(str, row)) for row in rows)]) + "\n")
    return path


def frame_levels(video: torch.Tensor) -> list[float]:
    return [(v + 1) * 127.5 for v in video[:, :, 8, 8].mean(1).tolist()]


def test_captioned_csv_item_shape_range_and_centred_stride(videos, tmp_path):
    manifest = write_csv(tmp_path / "m.csv", [("long.mp4", "a red car")])
    item = CaptionedVideos(manifest, videos, augment=False, **CLIP)[0]
    assert set(item) == {"video", "caption", "label", "image_captions"}
    assert item["video"].shape == (4, 3, 16, 16) and item["video"].dtype == torch.float32
    assert item["video"].min() >= -1 and item["video"].max() <= 1
    assert (item["caption"], item["label"], item["image_captions"]) == ("a red car", 0, [])
    # 24 frames, span (4-1)*2+1 = 7: the centred window starts at (24-7)//2 = 8 and takes every 2nd frame.
    expected = torch.tensor([grey(media.level(i)) for i in (8, 10, 12, 14)])
    assert torch.allclose(item["video"][:, :, 8, 8].mean(1), expected, atol=GREY_TOLERANCE)


def test_random_temporal_crop_keeps_stride_and_varies(videos, tmp_path):
    manifest = write_csv(tmp_path / "m.csv", [("long.mp4", "a red car")])
    dataset = CaptionedVideos(manifest, videos, augment=True, **CLIP)
    starts = set()
    for epoch in range(6):  # an epoch-tagged index: the same clip, drawn in epoch `epoch`
        levels = np.array(frame_levels(dataset[epoch * len(dataset)]["video"]))
        assert np.allclose(np.diff(levels), 2 * 9, atol=3)  # consecutive sampled frames are 2 decoded frames apart
        starts.add(round((levels[0] - media.level(0)) / 9))
    assert len(starts) > 1 and all(0 <= s <= 24 - 7 for s in starts)


def test_jsonl_start_end_window(videos, tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"path": "long.mp4", "caption": "dog", "start": 1.0, "end": 2.0, "label": 3}) + "\n")
    item = CaptionedVideos(manifest, videos, augment=False, frames=8, resolution=16)[0]
    # 8 fps: [1, 2) s holds frames 8..15, exactly the 8 asked for.
    assert np.allclose(frame_levels(item["video"]), [media.level(i) for i in range(8, 16)], atol=3)
    assert item["label"] == 3


def test_resize_short_side_then_centre_or_random_crop():
    from PIL import Image

    columns = np.tile((np.arange(40) * 6).astype(np.uint8), (20, 1))  # 40 wide, 20 high, value = 6 * column
    image = Image.fromarray(np.stack([columns] * 3, axis=-1))
    centred = frames_to_tensor([image], 10, None, random_crop=False)
    assert centred.shape == (1, 3, 10, 10)
    # Short side 20 -> 10 halves the width to 20; the centre crop keeps resized columns 5..14 (source 10..29).
    assert abs(int(centred[0, 0, 5, 0]) - 6 * 10.5) <= 3 and abs(int(centred[0, 0, 5, 9]) - 6 * 28.5) <= 3
    lefts = {round((int(frames_to_tensor([image], 10, random.Random(seed), True)[0, 0, 5, 0]) / 6 - 0.5) / 2)
             for seed in range(8)}
    assert len(lefts) > 1 and lefts <= set(range(11))


def test_bad_inputs_are_skipped_counted_and_logged_once(videos, tmp_path, caplog):
    manifest = write_csv(tmp_path / "m.csv", [("long.mp4", "good one"), ("short.mp4", "too short"),
                                              ("corrupt.mp4", "random bytes"), ("missing.mp4", "no file"),
                                              ("other.mp4", ""), ("other.mp4", "good two")])
    dataset = CaptionedVideos(manifest, videos, augment=False, max_bad_fraction=0.95, **CLIP)
    with caplog.at_level(logging.WARNING, logger="ristretto.engine.video_data"):
        for _ in range(2):
            batch = dataset.__getitems__(list(range(len(dataset))))
            assert {item["caption"] for item in batch} <= {"good one", "good two"}
            assert batch[0]["caption"] == "good one" and batch[5]["caption"] == "good two"
    assert set(map(Path, dataset.bad_paths)) == {videos / n for n in ("short.mp4", "corrupt.mp4", "missing.mp4",
                                                                      "other.mp4")}
    assert dataset.bad_paths[str(videos / "other.mp4")] == "empty caption"
    assert dataset.bad_draws >= 8  # 4 bad rows, read twice (plus failed redraws)
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 4 and sum("corrupt.mp4" in m for m in logged) == 1


def test_too_many_bad_draws_raise(videos, tmp_path):
    manifest = write_csv(tmp_path / "m.csv", [("long.mp4", "good"), ("short.mp4", "x"), ("corrupt.mp4", "y"),
                                              ("missing.mp4", "z")])
    dataset = CaptionedVideos(manifest, videos, augment=False, max_bad_fraction=0.5, **CLIP)
    with pytest.raises(DataError, match="max_bad_fraction=0.5"):
        dataset.__getitems__([1, 2, 3])  # 3 bad first draws against 3 needed: already 50%, then more
    assert dataset.__getitems__([0, 0, 0, 1])[3]["caption"] == "good"  # 1 bad in 5 draws is fine


def test_manifest_errors_name_file_and_line(videos, tmp_path):
    no_caption = write_csv(tmp_path / "a.csv", [("long.mp4", "x")], header="path,text")
    with pytest.raises(DataError, match=r"a\.csv:1: .*'caption'"):
        CaptionedVideos(no_caption, videos, **CLIP)
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text('{"path": "long.mp4", "caption": "x"}\n\n{"caption": "no path"}\n')
    with pytest.raises(DataError, match=r"b\.jsonl:3: missing 'path'"):
        CaptionedVideos(jsonl, videos, **CLIP)
    bad_start = write_csv(tmp_path / "c.csv", [("long.mp4", "x", 0, 1), ("long.mp4", "y", "soon", 2)],
                          header="path,caption,start,end")
    with pytest.raises(DataError, match=r"c\.csv:3: start must be a number of seconds"):
        CaptionedVideos(bad_start, videos, **CLIP)
    with pytest.raises(DataError, match="data.root: folder .*nowhere does not exist"):
        CaptionedVideos(no_caption, tmp_path / "nowhere", **CLIP)
    with pytest.raises(DataError, match="data.root"):
        ClassFolders(tmp_path / "nowhere", **CLIP)


def test_class_folders_sorted_labels_and_captions(videos, tmp_path):
    for name, video in (("Walking", "long.mp4"), ("Archery", "other.mp4"), ("Archery", "long.mp4")):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / video).write_bytes((videos / video).read_bytes())
    dataset = ClassFolders(tmp_path, augment=False, **CLIP)
    assert dataset.classes == ["Archery", "Walking"] and len(dataset) == 3
    assert [(dataset[i]["caption"], dataset[i]["label"]) for i in range(3)] == [("Archery", 0)] * 2 + [("Walking", 1)]


def test_joint_images_from_an_image_folder(videos, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    media.write_image(images / "white_cat.png", 200)
    media.write_image(images / "dark-dog.jpg", 40)
    manifest = write_csv(tmp_path / "m.csv", [("long.mp4", "a video")])
    by_stem = ImageFolder(images, 16, augment=False)
    item = CaptionedVideos(manifest, videos, num_images=3, images=by_stem, augment=False, **CLIP)[0]
    assert item["video"].shape == (4 + 3, 3, 16, 16) and len(item["image_captions"]) == 3
    for caption, still in zip(item["image_captions"], item["video"][4:]):
        assert caption in ("white cat", "dark dog")
        assert abs((still.mean() + 1) * 127.5 - (200 if caption == "white cat" else 40)) < 4
    write_csv(images / "captions.csv", [("white_cat.png", "a cat sleeping")])
    listed = ImageFolder(images, 16, augment=False)
    assert [e.caption for e in listed.entries] == ["a cat sleeping"]


def test_joint_stills_from_other_videos(videos, tmp_path):
    manifest = write_csv(tmp_path / "m.csv", [("long.mp4", "first"), ("other.mp4", "second")])
    dataset = CaptionedVideos(manifest, videos, num_images=2, augment=False, **CLIP)
    item = dataset[0]
    assert item["video"].shape == (6, 3, 16, 16)
    assert set(item["image_captions"]) <= {"first", "second"} and len(item["image_captions"]) == 2
    assert torch.equal(dataset[0]["video"], item["video"])  # augment=False: stills are a function of the index


def captioned_config(videos: Path, manifest: Path, *extra: str):
    return build_config("tiny-t2v", ["data.kind=captioned", f"data.manifest={manifest}", f"data.root={videos}",
                                     "data.frames=4", "data.resolution=16", "data.frame_stride=2", *extra])


def test_build_dataset_dispatch(videos, tmp_path):
    manifest = write_csv(tmp_path / "m.csv", [("long.mp4", "x")])
    assert isinstance(build_dataset(captioned_config(videos, manifest)), CaptionedVideos)
    synthetic = build_dataset(build_config("tiny-t2v", ["data.synthetic_size=3"]))
    assert len(synthetic) == 3 and synthetic[0]["video"].shape == (8, 3, 32, 32)
    with pytest.raises(DataError, match="data.manifest"):
        build_dataset(build_config("tiny-t2v", ["data.kind=captioned"]))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_loader_batches_and_resume_from_consumed_position(videos, tmp_path, num_workers):
    rows = [("long.mp4" if i % 2 else "other.mp4", f"clip {i}") for i in range(6)]
    manifest = write_csv(tmp_path / "m.csv", rows)
    dataset = build_dataset(captioned_config(videos, manifest), augment=False)

    def run(state=None, batches=4):
        loader = build_loader(dataset, 2, ResumableSampler(len(dataset), seed=3), num_workers=num_workers)
        if state:
            loader.load_state_dict(state)
        seen, iterator = [], iter(loader)
        for _ in range(batches):
            batch = next(iterator)
            seen.append(batch["caption"])
        return seen, loader.state_dict(), batch

    straight, _, batch = run(batches=5)
    assert batch["video"].shape == (2, 4, 3, 16, 16) and batch["label"].dtype == torch.int64
    first, state, _ = run(batches=2)
    resumed, _, _ = run(state, batches=3)
    assert state == {"epoch": 0, "position": 4}  # consumed, not prefetched
    assert first + resumed == straight  # crosses the epoch boundary (6 clips) too


def test_augmented_crops_resume_exactly_and_change_per_epoch(videos, tmp_path):
    rows = [("long.mp4", f"clip {i}") for i in range(4)]
    manifest = write_csv(tmp_path / "m.csv", rows)
    dataset = build_dataset(captioned_config(videos, manifest), augment=True)
    assert dataset.epoch_tagged_indices

    def run(state=None, batches=4):
        sampler = ResumableSampler(len(dataset), seed=3, tag_epochs=True)
        loader = build_loader(dataset, 2, sampler, num_workers=0)
        if state:
            loader.load_state_dict(state)
        iterator = iter(loader)
        videos_seen = [next(iterator)["video"] for _ in range(batches)]
        return videos_seen, loader.state_dict()

    straight, _ = run(batches=4)  # two epochs of 4 clips
    first, state = run(batches=1)
    resumed, _ = run(state, batches=3)
    for a, b in zip(first + resumed, straight):
        assert torch.equal(a, b)  # the same crops after a resume, not only the same clips
    # Every clip is the same file, so epochs differ only by their random crops and temporal offsets.
    assert not torch.equal(torch.cat(straight[:2]), torch.cat(straight[2:]))


def test_collate_stacks_tensors_and_keeps_strings():
    items = [{"video": torch.zeros(2, 3, 4, 4), "caption": "a", "label": 1, "image_captions": ["x"]},
             {"video": torch.ones(2, 3, 4, 4), "caption": "b", "label": 2, "image_captions": ["y"]}]
    batch = collate(items)
    assert batch["video"].shape == (2, 2, 3, 4, 4) and batch["label"].tolist() == [1, 2]
    assert batch["caption"] == ["a", "b"] and batch["image_captions"] == [["x"], ["y"]]
