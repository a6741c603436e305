"""VAE, T5 encoder and latent cache, with a tiny random AutoencoderKL and T5 saved to tmp_path and loaded through
the real loading code: shapes, chunking, the cache round trip, resume, config mismatch and the CLI."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("av")
pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent))
import media_fixtures as media  # noqa: E402

from ristretto.engine.cache import CachedLatents, main, write_cache  # noqa: E402
from ristretto.engine.config import build_config  # noqa: E402
from ristretto.engine.datasets import build_dataset, build_loader  # noqa: E402
from ristretto.engine.sampler import ResumableSampler  # noqa: E402
from ristretto.engine.text_encoder import build_text_encoder  # noqa: E402
from ristretto.engine.vae import IdentityVAE, build_vae  # noqa: E402
from ristretto.engine.video_data import DataError  # noqa: E402

BF16_TOLERANCE = dict(atol=2e-2, rtol=1e-2)  # bf16 keeps 8 bits of mantissa: relative error <= 2^-8


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("assets")
    (root / "videos").mkdir()
    for i in range(5):
        media.write_video(root / "videos" / f"clip{i}.mp4", 12 + i)
    media.write_corrupt(root / "videos" / "corrupt.mp4")
    rows = [f"clip{i}.mp4,a red car runs {word}" for i, word in enumerate(["left", "right", "up", "down", "left"])]
    rows.insert(2, "corrupt.mp4,a broken video")
    (root / "clips.csv").write_text("path,caption\n" + "\n".join(rows) + "\n")
    return {"root": root, "vae": media.save_tiny_vae(root / "vae"), "t5": media.save_tiny_t5(root / "t5")}


def overrides(assets: dict, *extra: str) -> list[str]:
    return ["data.kind=captioned", f"data.manifest={assets['root'] / 'clips.csv'}",
            f"data.root={assets['root'] / 'videos'}", "data.frames=4", "data.resolution=16", "data.frame_stride=2",
            f"model.vae={assets['vae']}", f"model.text_encoder={assets['t5']}", "model.in_channels=4",
            "model.caption_channels=16", "model.caption_length=8", "model.patch_size=2", *extra]


def cached_config(assets: dict, cache_dir: Path, *extra: str):
    return build_config("tiny-t2v", overrides(assets, "data.kind=cached", f"data.cache_dir={cache_dir}", *extra))


def test_vae_encode_decode_shapes_chunks_and_lazy_decoder(assets):
    config = build_config("tiny-t2v", overrides(assets))
    video = torch.rand(2, 3, 3, 16, 16) * 2 - 1
    vae = build_vae(config.model, chunk_size=2)
    assert vae.model.decoder is None  # encode-only until decode() is called
    latents = vae.encode(video)
    assert latents.shape == (2, 3, 4, 8, 8) and latents.dtype == torch.float32
    whole = build_vae(config.model, chunk_size=16).encode(video)
    assert torch.allclose(latents, whole, atol=1e-5)  # chunking does not change the result
    unscaled = vae.model.encode(video[1, 2:3]).latent_dist.mean
    assert torch.allclose(latents[1, 2:3], unscaled * 0.18215, atol=1e-5)  # frame order kept, scaled, mean
    assert not torch.equal(vae.encode(video, sample=True, generator=torch.Generator().manual_seed(0)), latents)
    decoded = vae.decode(latents)
    assert decoded.shape == video.shape and decoded.abs().max() <= 1
    assert isinstance(build_vae(build_config().model), IdentityVAE)


def test_t5_encoder_shapes_mask_and_null_caption(assets):
    config = build_config("tiny-t2v", overrides(assets))
    encoder = build_text_encoder(config.model)
    embeddings, mask = encoder(["a red car runs left", "", "a a a a a a a a a a a a"])
    assert embeddings.shape == (3, 8, 16) and embeddings.dtype == torch.float32 and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [6, 1, 8]  # 5 words + </s>; "" is just </s>; cut at max_length
    assert torch.isfinite(embeddings).all()
    alone, _ = encoder(["a red car runs left"])
    assert torch.allclose(alone[0], embeddings[0], atol=1e-5)  # padding is masked out of the encoder's attention


def test_cache_round_trip_equals_live_encoding(assets, tmp_path):
    out = tmp_path / "cache"
    assert main(["--preset", "tiny-t2v", *sum((["--set", o] for o in overrides(assets)), []), "--out", str(out),
                 "--shard-size", "4", "--batch-size", "2"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["latent_shape"] == [4, 4, 8, 8]
    assert [s["rows"] for s in manifest["shards"]] == [3, 2]  # the corrupt clip (row 2) is left out

    cached = build_dataset(cached_config(assets, out))
    assert isinstance(cached, CachedLatents) and len(cached) == 5
    live_config = build_config("tiny-t2v", overrides(assets))
    live = build_dataset(live_config, augment=False)
    vae, text_encoder = build_vae(live_config.model), build_text_encoder(live_config.model)
    for cached_index, live_index in ((0, 0), (2, 3), (4, 5)):
        item, source = cached[cached_index], live[live_index]
        assert item["caption"] == source["caption"] and item["label"] == source["label"]
        assert item["latents"].shape == (4, 4, 8, 8) and item["latents"].dtype == torch.float32
        assert torch.allclose(item["latents"], vae.encode(source["video"][None])[0], **BF16_TOLERANCE)
        embeddings, mask = text_encoder([source["caption"]])
        assert torch.allclose(item["caption_embeds"], embeddings[0], **BF16_TOLERANCE)
        assert torch.equal(item["caption_mask"], mask[0])
    null_embeddings, null_mask = text_encoder([""])  # CFG dropout trains on "" without loading the text encoder
    assert torch.allclose(cached.null_caption[0], null_embeddings[0]) and torch.equal(cached.null_caption[1], null_mask[0])

    batch = next(iter(build_loader(cached, 2, ResumableSampler(len(cached), seed=0))))
    assert batch["latents"].shape == (2, 4, 4, 8, 8) and batch["caption_embeds"].shape == (2, 8, 16)
    assert batch["caption_mask"].dtype == torch.bool and len(batch["caption"]) == 2


def test_cache_resume_skips_finished_shards(assets, tmp_path):
    config = build_config("tiny-t2v", overrides(assets))
    out = tmp_path / "cache"
    assert write_cache(config, out, shard_size=2) == {"written": 3, "skipped": 0}
    shards = sorted(out.glob("shard_*.safetensors"))
    stamps = {p.name: p.stat().st_mtime_ns for p in shards}
    shards[1].unlink()  # as if the first run was killed while writing shard 1
    (out / "shard_00001.tmp").write_bytes(b"half a shard")
    assert write_cache(config, out, shard_size=2) == {"written": 1, "skipped": 2}
    assert {p.name: p.stat().st_mtime_ns for p in shards if p != shards[1]} == \
           {k: v for k, v in stamps.items() if k != shards[1].name}
    assert len(CachedLatents(out, cached_config(assets, out))) == 5
    with pytest.raises(DataError, match="resolution=16"):  # resuming into a cache of another config is refused
        write_cache(build_config("tiny-t2v", overrides(assets, "data.resolution=32")), out, shard_size=2)


def test_cache_config_mismatch_names_field_and_dir(assets, tmp_path):
    out = tmp_path / "cache"
    write_cache(build_config("tiny-t2v", overrides(assets)), out, shard_size=8)
    with pytest.raises(DataError, match=rf"data.frames: the cache in {out} was written with frames=4"):
        CachedLatents(out, cached_config(assets, out, "data.frames=6"))
    with pytest.raises(DataError, match="model.caption_length"):
        CachedLatents(out, cached_config(assets, out, "model.caption_length=12"))
    with pytest.raises(DataError, match="no manifest.json"):
        CachedLatents(tmp_path / "empty", cached_config(assets, out))
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(DataError, match="incomplete"):
        CachedLatents(out, cached_config(assets, out))


def test_cache_cli_reports_user_errors_in_one_line(assets, tmp_path, capsys):
    args = ["--set", "data.kind=captioned", "--set", f"data.manifest={tmp_path / 'none.csv'}", "--out", str(tmp_path)]
    assert main(args) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    wrong_width = overrides(assets, "model.caption_channels=32")
    with pytest.raises(DataError, match="model.caption_channels"):
        write_cache(build_config("tiny-t2v", wrong_width), tmp_path / "c")
    assert not os.path.exists(tmp_path / "c" / "manifest.json")


def test_cache_with_joint_stills_keeps_their_captions(assets, tmp_path):
    out = tmp_path / "cache"
    write_cache(build_config("tiny-t2v", overrides(assets, "data.num_images=2")), out, shard_size=8)
    item = CachedLatents(out, cached_config(assets, out, "data.num_images=2"))[1]
    assert item["latents"].shape == (4 + 2, 4, 8, 8)
    assert item["image_caption_embeds"].shape == (2, 8, 16) and item["image_caption_mask"].shape == (2, 8)
    assert len(item["image_captions"]) == 2 and all(c.startswith("a red car runs") for c in item["image_captions"])
    embeddings, _ = build_text_encoder(build_config("tiny-t2v", overrides(assets)).model)(item["image_captions"])
    assert torch.allclose(item["image_caption_embeds"], embeddings, **BF16_TOLERANCE)
