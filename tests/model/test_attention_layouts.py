"""Attention layouts without copies: the Triton temporal path equals the attention-backend path on the whole model
(joint image+video included), the layout moves are what they say, and cross-attention without repeated K/V equals
the per-frame formulation."""
import copy

import pytest
import torch

from ristretto.engine.build import apply_attention_backend, build_plain_model
from ristretto.engine.config import ConfigError, build_config
from ristretto.kernels import reference
from ristretto.model.attention import CrossAttention, attention_over_frames
from ristretto.model.layout import (frame_sequences, frames_from_sequences, sequences_from_frames, video_rows,
                                    with_image_rows)

TINY = ["model.hidden_size=32", "model.depth=2", "model.num_heads=2", "data.frames=3", "data.resolution=16",
        "model.caption_channels=12", "model.caption_length=6"]


def randomised(model):
    """Zero-initialised layers would hide differences: give every parameter a random value."""
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2)
    return model


def run(model, video, timestep, num_images, conditions):
    model.zero_grad()
    out = model(video, timestep, num_images=num_images, **conditions)
    out.square().mean().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("preset,num_images", [("tiny-t2v", 0), ("tiny-t2v", 2), ("latte-xl2-ucf", 0)])
def test_model_with_triton_temporal_equals_attention_backend(preset, num_images):
    config = build_config(preset, TINY)
    backend_model = randomised(build_plain_model(config))
    triton_model = copy.deepcopy(backend_model)
    apply_attention_backend(triton_model, config.model.attention_backend, temporal="triton")
    gen = torch.Generator().manual_seed(1)
    frames = config.data.frames + num_images
    size = 16 if config.model.vae == "identity" else 2
    video = torch.randn(2, frames, config.model.in_channels, size, size, generator=gen)
    if config.model.kind == "class":
        conditions = {"label": torch.tensor([1, 4])}
    else:
        conditions = {"caption": torch.randn(2, 6, 12, generator=gen),
                      "caption_mask": torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6], dtype=torch.bool)}
        if num_images:
            conditions["image_caption"] = torch.randn(2, num_images, 6, 12, generator=gen)
    expected = run(backend_model, video, torch.tensor([10, 600]), num_images, conditions)
    got = run(triton_model, video, torch.tensor([10, 600]), num_images, conditions)
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
    assert got[1].keys() == expected[1].keys()
    for name in expected[1]:
        torch.testing.assert_close(got[1][name], expected[1][name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_unknown_temporal_attention_names_the_field():
    model = build_plain_model(build_config("tiny-t2v", TINY))
    with pytest.raises(ValueError, match=r"model.temporal_attention: unknown 'flash'"):
        apply_attention_backend(model, "sdpa", temporal="flash")


def test_triton_temporal_attention_refuses_more_frames_than_it_holds():
    with pytest.raises(ConfigError, match=r"model.temporal_attention: .* at most 64 frames, got data.frames=65"):
        build_config("tiny-t2v", ["model.temporal_attention=triton", "data.frames=65"])


def test_triton_temporal_attention_on_cpu_without_the_interpreter_is_refused_up_front(monkeypatch):
    from ristretto.engine.preflight import check_environment  # noqa: PLC0415

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    config = build_config("tiny-t2v", ["model.temporal_attention=triton"])
    with pytest.raises(ConfigError, match=r"model.temporal_attention=triton: .* CUDA GPU .* on cpu; use "
                                          r"model.temporal_attention=attention_backend"):
        check_environment(config, torch.device("cpu"))


def test_attention_over_frames_equals_the_reference_twin():
    qkv = torch.randn(2 * 5, 7, 3, 2, 8, dtype=torch.float64)
    got = attention_over_frames(reference_sdpa)(qkv, 5, project=lambda out, layout: layout.to_rows(out))
    torch.testing.assert_close(got, reference.temporal_attention(qkv, 5).flatten(-2))


def reference_sdpa(q, k, v, mask=None):
    return torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                            v.transpose(1, 2)).transpose(1, 2)


def test_frame_sequences_round_trip_and_order():
    qkv = torch.randn(2 * 3, 4, 3, 2, 5)  # B=2, F=3, S=4
    q, k, v = frame_sequences(qkv, 3)
    assert q.shape == (2 * 4, 3, 2, 5)
    torch.testing.assert_close(k[1 * 4 + 2, 1], qkv[1 * 3 + 1, 2, 1])  # sample 1, position 2, frame 1
    assert q.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()  # one copy, saved once
    torch.testing.assert_close(frames_from_sequences(v, 4), qkv[:, :, 2])
    torch.testing.assert_close(sequences_from_frames(qkv[:, :, 2], 3), v)


def test_video_rows_are_a_view_without_images_and_images_come_back_unchanged():
    tokens = torch.randn(2 * 3, 4, 8)
    assert video_rows(tokens, 2, 3).data_ptr() == tokens.data_ptr()
    joint = torch.randn(2 * 5, 4, 8)  # 3 video frames + 2 images per sample
    video = video_rows(joint, 2, 3)
    torch.testing.assert_close(video, joint.view(2, 5, 4, 8)[:, :3].reshape(6, 4, 8))
    torch.testing.assert_close(with_image_rows(video + 1, joint, 2, 3).view(2, 5, 4, 8)[:, 3:],
                               joint.view(2, 5, 4, 8)[:, 3:])


@pytest.mark.parametrize("captions", [2, 6])  # one caption per sample, or per frame (joint image+video)
def test_cross_attention_without_repeats_equals_per_frame_attention(captions):
    torch.manual_seed(0)
    attention = CrossAttention(16, 2)
    x, context = torch.randn(6, 5, 16), torch.randn(captions, 7, 16)
    mask = torch.arange(7)[None] < torch.randint(1, 8, (captions, 1))
    got = attention(x, context, mask)
    # today's formulation: K/V and the mask repeated for every frame, frames attend one by one
    rows_per_caption = 6 // captions
    k, v = attention.kv(context).repeat_interleave(rows_per_caption, 0).view(6, 7, 2, 2, 8).unbind(2)
    q = attention.q(x).view(6, 5, 2, 8)
    out = attention.attention_fn(q, k, v, mask.repeat_interleave(rows_per_caption, 0))
    torch.testing.assert_close(got, attention.proj(out.reshape(6, 5, 16)), atol=1e-6, rtol=1e-5)


def test_triton_temporal_attention_under_bf16_autocast_is_close_to_fp32():
    config = build_config("tiny-class", TINY)
    model = randomised(build_plain_model(config))
    apply_attention_backend(model, "sdpa", temporal="triton")
    video = torch.randn(2, 3, config.model.in_channels, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        exact = model(video, torch.tensor([10, 600]), label=torch.tensor([1, 4]))
        with torch.autocast("cpu", torch.bfloat16):
            low = model(video, torch.tensor([10, 600]), label=torch.tensor([1, 4]))
    assert (low.float() - exact).abs().max() <= 0.05 * exact.abs().max()  # bf16 q, k, v reach the kernel
