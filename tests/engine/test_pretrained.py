"""model.init (a diffusers Latte folder, sharded or not, or one of ours), model.init_spatial (PixArt-alpha into the
spatial blocks, temporal blocks at identity) and model.freeze=spatial. Tiny random diffusers models are built and
saved in temporary folders; nothing is downloaded."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ristretto.engine import plan
from ristretto.engine.build import build_training_model
from ristretto.engine.config import ConfigError, build_config
from ristretto.engine.train import build_optimizer, train
from ristretto.engine.weights import DIFFUSERS_WEIGHTS
from ristretto.model.diffusers_interop import to_diffusers

diffusers = pytest.importorskip("diffusers")

LATTE = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
             cross_attention_dim=32, attention_bias=True, sample_size=8, patch_size=2, activation_fn="gelu-approximate",
             num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
             caption_channels=24, video_length=4)
PIXART = {k: v for k, v in LATTE.items() if k != "video_length"} | {"use_additional_conditions": False}
RUN = ["data.kind=cached",  # 4-channel latents; these tests read no data (the training ones use RGB clips)
       "data.frames=4", "data.resolution=8", "train.device=cpu", "train.batch_size=2", "train.max_steps=2",
       "train.warmup_steps=1", "train.lr=1e-2", "diffusion.sample_steps=1", "sample.num_samples=1",
       "model.caption_channels=24"]


def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values everywhere (diffusers zero-initialises some outputs, which would hide mapping mistakes)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def latte_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("latte") / "Latte-1"
    model = randomise(diffusers.LatteTransformer3DModel(**LATTE), 0)
    model.save_pretrained(folder / "transformer", max_shard_size="40KB")  # a pipeline layout, sharded
    assert (folder / "transformer" / f"{DIFFUSERS_WEIGHTS}.index.json").is_file()
    return folder, model


def pixart_folder(tmp_path, **overrides):
    model = randomise(diffusers.PixArtTransformer2DModel(**(PIXART | overrides)), 1)
    model.save_pretrained(tmp_path / "pixart")
    return tmp_path / "pixart", model


def inputs(frames: int, size: int = 8, seed: int = 2):
    generator = torch.Generator().manual_seed(seed)
    video = torch.randn(2, frames, 4, size, size, generator=generator)
    caption = torch.randn(2, 5, 24, generator=generator)
    return video, caption, torch.tensor([3, 801])


def test_init_from_a_sharded_diffusers_latte_takes_its_shape_and_equals_it(latte_folder):
    folder, reference = latte_folder
    config = build_config("tiny-t2v", RUN + [f"model.init={folder}"])
    model = config.model
    assert (model.hidden_size, model.num_heads, model.depth, model.in_channels, model.learn_sigma,
            model.patch_size, model.norm_eps) == (32, 2, 2, 4, True, 2, 1e-6)
    ours, _, _ = build_training_model(config, torch.device("cpu"))
    video, caption, timestep = inputs(frames=4)
    with torch.no_grad():
        got = ours.eval()(video, timestep, caption=caption)
        expected = reference(video.permute(0, 2, 1, 3, 4), timestep, encoder_hidden_states=caption).sample
    # fp32; outputs are O(1) with these random weights: differences are operation order (fused q|k|v)
    torch.testing.assert_close(got, expected.permute(0, 2, 1, 3, 4), atol=1e-4, rtol=1e-4)


def test_init_at_another_resolution_and_frame_count(latte_folder):
    folder, reference = latte_folder
    config = build_config("tiny-t2v", RUN + [f"model.init={folder}", "data.frames=3", "data.resolution=12"])
    ours, _, _ = build_training_model(config, torch.device("cpu"))
    expected = to_diffusers(ours.state_dict())
    assert all(torch.equal(expected[k], v) for k, v in reference.state_dict().items())
    video, caption, timestep = inputs(frames=3, size=12)
    with torch.no_grad():
        assert ours.eval()(video, timestep, caption=caption).shape == (2, 3, 8, 12, 12)


def test_an_explicit_set_that_contradicts_the_pretrained_shape_is_one_line(latte_folder):
    folder, _ = latte_folder
    with pytest.raises(ConfigError) as error:
        build_config("tiny-t2v", RUN + [f"model.init={folder}", "model.hidden_size=64", "model.depth=2",
                                        "model.patch_size=4"])
    message = str(error.value)
    assert "\n" not in message and "model.hidden_size=64 (pretrained: 32)" in message
    assert "model.patch_size=4 (pretrained: 2)" in message and "model.depth" not in message  # depth=2 agrees


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    model = diffusers.LatteTransformer3DModel(**LATTE)
    model.save_pretrained(tmp_path / "latte")
    state = load_file(str(tmp_path / "latte" / DIFFUSERS_WEIGHTS))
    del state["proj_out.bias"], state["transformer_blocks.1.attn2.to_k.weight"]
    state["extra.weight"] = torch.zeros(1)
    state["caption_projection.linear_1.weight"] = torch.zeros(32, 7)
    save_file(state, str(tmp_path / "latte" / DIFFUSERS_WEIGHTS))
    with pytest.raises(ConfigError) as error:
        build_config("tiny-t2v", RUN + [f"model.init={tmp_path / 'latte'}"])
    message = str(error.value)
    assert "missing keys: proj_out.bias, transformer_blocks.1.attn2.to_k.weight" in message
    assert "unexpected keys: extra.weight" in message
    assert "caption_projection.linear_1.weight [32, 7] (expected [32, 24])" in message


def test_init_from_one_of_our_runs(tmp_path):
    source = build_config("tiny-t2v", RUN + ["model.hidden_size=48", "model.num_heads=3"])
    model, _, _ = build_training_model(source, torch.device("cpu"))
    randomise(model, 3)
    (tmp_path / "run" / "weights").mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": vars(source.model)}))
    save_file(model.state_dict(), str(tmp_path / "run" / "weights" / "ema.safetensors"))
    for folder in (tmp_path / "run", tmp_path / "run" / "weights"):
        config = build_config("tiny-t2v", RUN + [f"model.init={folder}"])
        assert config.model.hidden_size == 48
        loaded, _, _ = build_training_model(config, torch.device("cpu"))
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_not_a_pretrained_folder_is_named(tmp_path):
    with pytest.raises(ConfigError, match="model.init=.*not a diffusers LatteTransformer3DModel folder"):
        build_config("tiny-t2v", [f"model.init={tmp_path}"])


@pytest.mark.parametrize("size_conditions", [False, True])
def test_init_spatial_from_pixart_equals_the_image_model_on_every_frame(tmp_path, size_conditions):
    width = dict(num_attention_heads=3, cross_attention_dim=48) if size_conditions else {}  # size embeddings: D/3 each
    folder, pixart = pixart_folder(tmp_path, use_additional_conditions=size_conditions, **width)
    config = build_config("tiny-t2v", RUN + [f"model.init_spatial={folder}", "data.frames=3"])
    ours, _, _ = build_training_model(config, torch.device("cpu"))
    ours.eval()
    # The one part no weight can cancel: Latte's fixed temporal position table, added after the first spatial
    # block (diffusers' Latte does the same). Without it the video model is the image model on every frame.
    ours.temporal_pos_embed.zero_()
    video, caption, timestep = inputs(frames=3)
    height = width = config.data.resolution
    extra = {"added_cond_kwargs": {"resolution": torch.tensor([[height, width]] * 2, dtype=torch.float32),
                                   "aspect_ratio": torch.tensor([[1.0]] * 2)}} if size_conditions else {}
    with torch.no_grad():
        got = ours(video, timestep, caption=caption)  # (B, F, 2C, H, W)
        for frame in range(3):
            expected = pixart(video[:, frame], encoder_hidden_states=caption, timestep=timestep,
                              **({"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}} | extra)).sample
            torch.testing.assert_close(got[:, frame], expected, atol=1e-4, rtol=1e-4)
    assert got.abs().max() > 0.1


def test_init_spatial_depth_mismatch_names_both_depths(tmp_path):
    folder, _ = pixart_folder(tmp_path)
    with pytest.raises(ConfigError, match=r"model.depth=3 \(pretrained: 2\)"):
        build_config("tiny-t2v", RUN + [f"model.init_spatial={folder}", "model.depth=3"])


def test_a_latte_folder_given_to_init_spatial_is_refused(latte_folder):
    with pytest.raises(ConfigError, match="LatteTransformer3DModel, expected a PixArtTransformer2DModel"):
        build_config("tiny-t2v", RUN + [f"model.init_spatial={latte_folder[0]}"])


def test_a_latent_model_on_pixels_is_refused(latte_folder):
    with pytest.raises(ConfigError, match="takes 4-channel latents but model.vae=identity"):
        build_config("tiny-t2v", [f"model.init={latte_folder[0]}"])


def test_freeze_spatial_trains_only_the_temporal_blocks(tmp_path):
    diffusers.LatteTransformer3DModel(**(LATTE | dict(in_channels=3, out_channels=3))).save_pretrained(tmp_path / "rgb")
    run = [s for s in RUN if not s.startswith("data.kind")]  # synthetic RGB clips
    config = build_config("tiny-t2v", run + [f"model.init={tmp_path / 'rgb'}", "model.freeze=spatial",
                                             "train.ema_decay=0"])
    model, _, _ = build_training_model(config, torch.device("cpu"))
    optimizer, _ = build_optimizer(model, config.train)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith(("blocks.1.", "blocks.3.")) for name in trainable)
    assert sum(p.numel() for group in optimizer.param_groups for p in group["params"]) == \
        sum(p.numel() for p in model.parameters() if p.requires_grad)
    predicted = plan.predict_memory(config, "cpu").breakdown["optimizer (AdamW m+v, fp32)"]
    assert predicted == plan.ADAMW_STATE_BYTES * sum(p.numel() for p in model.parameters() if p.requires_grad)

    train(config, tmp_path / "run")
    before, after = model.state_dict(), load_file(str(tmp_path / "run" / "weights" / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= trainable
    assert any(k.startswith("blocks.1.") for k in changed)


def test_frozen_run_resumes_and_cli_conflicts_are_one_line(tmp_path, capsys, latte_folder):
    from ristretto.engine.checkpoint import latest_checkpoint
    from ristretto.engine.cli import main

    diffusers.LatteTransformer3DModel(**(LATTE | dict(in_channels=3, out_channels=3))).save_pretrained(tmp_path / "rgb")
    run = [s for s in RUN if not s.startswith("data.kind")] + [f"model.init={tmp_path / 'rgb'}", "model.freeze=spatial"]
    train(build_config("tiny-t2v", run), tmp_path / "run")
    state = train(build_config("tiny-t2v", run + ["train.max_steps=3"]), tmp_path / "run",
                  resume=latest_checkpoint(tmp_path / "run"))  # the optimizer state of the temporal blocks only
    assert state.step == 3
    capsys.readouterr()
    assert main(["--set", f"model.init={latte_folder[0]}", "--set", "model.num_heads=4", "--out",
                 str(tmp_path / "bad")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "model.num_heads=4 (pretrained: 2)" in error


def test_freeze_without_pretrained_weights_is_refused():
    with pytest.raises(ConfigError, match="model.freeze=spatial: needs model.init or model.init_spatial"):
        build_config("tiny-t2v", ["model.freeze=spatial"])
