"""Synthetic captioned clips: grammar, held-out split, renderer, dataset, and the scorer on ground-truth clips."""
import io

import numpy as np
import pytest
import torch

from ristretto.engine.synthetic import (COLOUR_NAMES, COLOURS, DIRECTIONS, NUM_CLASSES, SHAPES, SyntheticClips,
                                        all_captions, caption_for, class_names, load_video, parse_caption,
                                        render_clip, score_against_captions, score_video, split_captions)


def _clips(frames, resolution, count, seed=1):
    """Ground-truth clips over all 72 captions (held-out ones included)."""
    dataset = SyntheticClips(frames, resolution, size=count, seed=seed, captions=all_captions())
    items = [dataset[i] for i in range(count)]
    return [item["video"] for item in items], [item["caption"] for item in items]


def _centroid_path(video):
    """(x, y) of the lit pixels' centroid per frame, straight from the pixels (independent of the scorer)."""
    lit = (video + 1).sum(dim=1)  # [F, H, W]
    grid = torch.arange(video.shape[-1], dtype=torch.float32)
    mass = lit.sum(dim=(1, 2))
    return (lit.sum(dim=1) * grid).sum(dim=1) / mass, (lit.sum(dim=2) * grid).sum(dim=1) / mass


def _mp4_round_trip(video, path):
    """Write with libx264 / yuv420p (mpeg4 when x264 is missing) and read back: the codec blurs colours."""
    av = pytest.importorskip("av")
    frames = ((video.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return load_video(path)


# ----------------------------------------------------------------------------------------------------------- grammar

def test_grammar_round_trip_and_errors():
    assert len(COLOURS) == NUM_CLASSES == len(class_names()) == 6 and len(SHAPES) == 3 and len(DIRECTIONS) == 4
    assert caption_for("red", "circle", "left") == "a red circle moving left"
    captions = all_captions()
    assert len(set(captions)) == 72
    assert all(caption_for(*parse_caption(c)) == c for c in captions)
    for bad in ("a red circle moving sideways", "a purple circle moving left", "red circle moving left", ""):
        with pytest.raises(ValueError, match="not in the synthetic grammar") as error:
            parse_caption(bad)
        assert repr(bad) in str(error.value)


@pytest.mark.parametrize("holdout", ["colour-direction", "triple"])
def test_split_holds_out_unseen_combinations_with_every_word_seen(holdout):
    train, heldout = split_captions(seed=0, holdout=holdout)
    assert (train, heldout) == split_captions(seed=0, holdout=holdout)
    assert not set(train) & set(heldout) and sorted(train + heldout) == sorted(all_captions())
    assert 0.15 <= len(heldout) / 72 <= 0.2
    train_words = {word for caption in train for word in parse_caption(caption)}
    assert train_words == set(COLOUR_NAMES) | set(SHAPES) | set(DIRECTIONS)
    train_pairs = {(c, d) for c, _, d in map(parse_caption, train)}
    heldout_pairs = {(c, d) for c, _, d in map(parse_caption, heldout)}
    if holdout == "colour-direction":  # the scored pair itself is new: held-out accuracy measures composition
        assert not train_pairs & heldout_pairs
    else:  # every word pair of a held-out triple still occurs in training
        assert heldout_pairs <= train_pairs
    assert split_captions(seed=1, holdout=holdout)[1] != heldout


# --------------------------------------------------------------------------------------------------------- rendering

@pytest.mark.parametrize("direction", DIRECTIONS)
def test_render_is_deterministic_in_range_and_moves_its_way(direction):
    caption = caption_for("green", "square", direction)
    video = render_clip(caption, 8, 32, torch.Generator().manual_seed(3))
    assert video.shape == (8, 3, 32, 32) and video.dtype == torch.float32
    assert torch.equal(video, render_clip(caption, 8, 32, torch.Generator().manual_seed(3)))
    assert video.min() >= -1 and video.max() <= 1 and video[:, 0].max() == -1  # green only: red channel stays black
    area = (video[:, 1] + 1).sum(dim=(1, 2)) / 2
    assert torch.allclose(area, area[0], rtol=1e-3)  # the whole object stays in view
    xs, ys = _centroid_path(video)
    dx, dy = (xs[-1] - xs[0]).item(), (ys[-1] - ys[0]).item()
    expected = {"left": (dx < -5, abs(dy) < 1e-3), "right": (dx > 5, abs(dy) < 1e-3),
                "up": (dy < -5, abs(dx) < 1e-3), "down": (dy > 5, abs(dx) < 1e-3)}[direction]
    assert all(expected), (direction, dx, dy)


# ----------------------------------------------------------------------------------------------------------- dataset

def test_dataset_is_deterministic_per_index_and_uses_training_captions():
    dataset = SyntheticClips(frames=4, resolution=16, size=64, seed=5)
    later = [dataset[i] for i in (9, 3)]
    fresh = SyntheticClips(frames=4, resolution=16, size=64, seed=5)
    for index, item in zip((9, 3), later):  # same item whatever was read before, as resume needs
        again = fresh[index]
        assert torch.equal(item["video"], again["video"]) and item["caption"] == again["caption"]
    assert not torch.equal(dataset[3]["video"], SyntheticClips(4, 16, size=64, seed=6)[3]["video"])
    train = set(split_captions()[0])
    items = [dataset[i] for i in range(64)]
    assert all(item["caption"] in train for item in items) and len({item["caption"] for item in items}) > 20
    assert all(item["label"] == COLOUR_NAMES.index(parse_caption(item["caption"])[0]) for item in items)
    assert len(dataset) == 64
    with pytest.raises(IndexError):
        dataset[64]
    with pytest.raises(ValueError, match="a pink circle"):
        SyntheticClips(4, 16, captions=["a pink circle moving up"])
    with pytest.raises(ValueError, match="no captions"):
        SyntheticClips(4, 16, captions=[])


def test_joint_image_frames_are_stills_with_their_own_captions():
    dataset = SyntheticClips(frames=6, resolution=32, size=16, seed=0, num_images=3)
    for index in range(4):
        item = dataset[index]
        assert item["video"].shape == (9, 3, 32, 32) and len(item["image_captions"]) == 3
        assert score_video(item["video"][:6])["colour"] == parse_caption(item["caption"])[0]
        for still, caption in zip(item["video"][6:], item["image_captions"]):
            assert score_video(still[None])["colour"] == parse_caption(caption)[0]
    assert SyntheticClips(frames=6, resolution=32, size=4)[0]["image_captions"] == []


# ------------------------------------------------------------------------------------------------------------ scorer

@pytest.mark.parametrize("resolution", [32, 16])
def test_scorer_reads_ground_truth_clean_and_noisy(resolution):
    videos, captions = _clips(8, resolution, 300)
    clean = score_against_captions(videos, captions)
    assert clean["n"] == 300 and clean["colour_accuracy"] >= 0.99 and clean["direction_accuracy"] >= 0.99
    assert clean["shape_accuracy"] >= 0.95
    generator = torch.Generator().manual_seed(0)
    noisy = score_against_captions([v + 0.05 * torch.randn(v.shape, generator=generator) for v in videos], captions)
    assert noisy["colour_accuracy"] >= 0.99 and noisy["direction_accuracy"] >= 0.99


@pytest.mark.parametrize("resolution", [32, 16])
def test_scorer_reads_ground_truth_after_mp4_round_trip(resolution, tmp_path):
    videos, captions = _clips(8, resolution, 60, seed=2)
    decoded = [_mp4_round_trip(v, tmp_path / f"{i}.mp4") for i, v in enumerate(videos)]
    assert decoded[0].shape == videos[0].shape and (decoded[0] - videos[0]).abs().max() > 0  # lossy, as intended
    scores = score_against_captions(decoded, captions)
    assert scores["colour_accuracy"] >= 0.99 and scores["direction_accuracy"] >= 0.99


def test_scorer_handles_empty_and_numpy_and_mismatched_inputs():
    assert score_video(-torch.ones(8, 3, 16, 16)) == {"colour": None, "direction": None, "shape": None}
    assert score_video(torch.zeros(8, 3, 16, 16))["colour"] is None  # flat grey is not an object
    video = render_clip("a blue triangle moving down", 8, 32, torch.Generator().manual_seed(0))
    assert score_video(video.numpy()) == {"colour": "blue", "direction": "down", "shape": "triangle"}
    assert score_video(video[:1])["direction"] is None  # one frame shows no motion
    wrong = score_against_captions([video], ["a red circle moving up"])
    assert wrong["colour_accuracy"] == wrong["direction_accuracy"] == wrong["shape_accuracy"] == 0
    with pytest.raises(ValueError, match="2 videos but 1 captions"):
        score_against_captions([video, video], ["a blue triangle moving down"])
    with pytest.raises(ValueError, match=r"\[F, 3, H, W\]"):
        score_video(video[0])


def test_load_video_reads_gif(tmp_path):
    from PIL import Image

    video = render_clip("a yellow circle moving right", 8, 32, torch.Generator().manual_seed(4))
    frames = [Image.fromarray(((f.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)) for f in video]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:], duration=125, loop=0)
    loaded = load_video(tmp_path / "clip.gif")
    assert loaded.shape == video.shape and loaded.min() >= -1 and loaded.max() <= 1
    assert score_video(loaded) == {"colour": "yellow", "direction": "right", "shape": "circle"}
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        load_video(tmp_path / "missing.mp4")


def test_entering_motion_starts_at_the_far_edge_on_one_trajectory_per_direction():
    for direction in DIRECTIONS:
        caption = caption_for("green", "square", direction)
        clips = [render_clip(caption, 8, 16, torch.Generator().manual_seed(seed), entering=True) for seed in (1, 2)]
        assert score_video(clips[0])["direction"] == direction
        # Only the size is random: the first frames' centroids agree to within the size difference.
        centroids = []
        for clip in clips:
            mask = (clip[0] > -0.5).any(dim=0).float()  # [H, W] object pixels of frame 0
            ys, xs = torch.nonzero(mask, as_tuple=True)
            centroids.append((xs.float().mean().item(), ys.float().mean().item()))
        assert abs(centroids[0][0] - centroids[1][0]) < 1.5 and abs(centroids[0][1] - centroids[1][1]) < 1.5
        start = centroids[0][0] if direction in ("left", "right") else centroids[0][1]
        assert (start < 8) == (direction in ("right", "down"))  # starts on the side it moves away from


@pytest.mark.parametrize("entering", [False, True])
def test_size_scale_grows_the_object_and_keeps_it_readable(entering):
    """data.synthetic_size_scale: the same draw with scale 1.5 covers about 2.25x the pixels, stays fully in view
    and still scores right; a scale that would fill the frame is refused, naming the factor."""
    captions = all_captions()[::5]
    for caption in captions:
        small, big = (render_clip(caption, 4, 16, torch.Generator().manual_seed(7), entering, scale)
                      for scale in (1.0, 1.5))
        area_small, area_big = ((clip + 1).sum() for clip in (small, big))
        assert 1.8 < area_big / area_small < 2.7
        per_frame = (big + 1).sum(dim=(1, 2, 3))
        assert (per_frame - per_frame[0]).abs().max() < 0.1 * per_frame[0]  # whole in every frame (up to sub-pixel jitter)
    videos = [render_clip(c, 4, 16, torch.Generator().manual_seed(i), entering, 1.5) for i, c in enumerate(captions)]
    scores = score_against_captions(videos, captions)
    assert scores["colour_accuracy"] == scores["direction_accuracy"] == scores["shape_accuracy"] == 1.0
    with pytest.raises(ValueError, match="size_scale=2.5"):
        render_clip(captions[0], 4, 16, torch.Generator().manual_seed(0), entering, 2.5)
    dataset = SyntheticClips(4, 16, size=2, captions=captions, entering=entering, size_scale=1.5)
    assert torch.equal(dataset[1]["video"], dataset[1]["video"])


def test_entering_curriculum_switches_to_random_starts_after_its_epochs():
    """data.synthetic_entering_epochs: passes 0..N-1 show entering objects, later passes the same clips starting
    anywhere; the sampler tags indices with their pass (index + epoch * size)."""
    curriculum = SyntheticClips(4, 16, size=8, entering_epochs=2, size_scale=1.5)
    entering = SyntheticClips(4, 16, size=8, entering=True, size_scale=1.5)
    random_start = SyntheticClips(4, 16, size=8, size_scale=1.5)
    assert curriculum.epoch_tagged_indices and not random_start.epoch_tagged_indices
    for index in (0, 3):
        assert torch.equal(curriculum[index]["video"], entering[index]["video"])
        assert torch.equal(curriculum[index + 8]["video"], entering[index]["video"])
        assert torch.equal(curriculum[index + 16]["video"], random_start[index]["video"])
        assert curriculum[index + 16]["caption"] == random_start[index]["caption"]
    assert not torch.equal(entering[3]["video"], random_start[3]["video"])
    with pytest.raises(IndexError):
        random_start[8]
