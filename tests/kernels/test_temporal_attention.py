"""The Triton temporal attention (its custom op) vs its torch twin: output and dqkv, odd frame counts and head dims, three dtypes.
Rule (flash-attention's): max|x - x_ref| <= 2 max|x_pt - x_ref| + atol, x_ref in fp64, x_pt the twin in x's dtype."""
import functools

import pytest
import torch

from ristretto.kernels import reference
from ristretto.kernels.custom_ops import temporal_attention
from ristretto.kernels.temporal_attention import MAX_FRAMES, launch_config
from ristretto.kernels.testing import assert_matches_reference

DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 1e-3), (torch.float16, 1e-4)]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


def make_qkv(samples, frames, positions, heads, dim, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(samples * frames, positions, 3, heads, dim, generator=gen)
    return qkv.to(device=device, dtype=dtype).requires_grad_()


def check(samples, frames, positions, heads, dim, dtype, atol, device):
    qkv = make_qkv(samples, frames, positions, heads, dim, dtype, device)
    assert_matches_reference(functools.partial(temporal_attention, frames=frames),
                             functools.partial(reference.temporal_attention, frames=frames), (qkv,), atol)


@pytest.mark.parametrize("dtype,atol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("frames", [1, 3, 16, 17])
def test_frame_counts(frames, dtype, atol, device):
    """F=1 (a single frame attends to itself), odd F, Latte's 16, 17 (pads to 32); 5 positions = 3 position blocks."""
    check(2, frames, 5, 2, 72, dtype, atol, device)


@pytest.mark.parametrize("dtype,atol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("dim", [64, 88, 128])
def test_head_dims(dim, dtype, atol, device):
    check(1, 3, 3, 3, dim, dtype, atol, device)


@pytest.mark.parametrize("dtype,atol", DTYPES, ids=DTYPE_IDS)
def test_many_pairs_per_program(dtype, atol, device):
    """dim 16: 4 heads x 4 positions per program; 3 heads and 5 positions leave padding pairs of both kinds."""
    check(2, 3, 5, 3, 16, dtype, atol, device)


def test_sixty_four_frames(device):
    check(1, MAX_FRAMES, 2, 1, 64, torch.float32, 1e-5, device)


def test_tiles_cover_odd_shapes():
    qkv = torch.empty(17 * 2, 5, 3, 2, 72)
    config = launch_config(qkv, 17)
    assert (config["F_PAD"], config["D_PAD"], config["HEAD_DIM"], config["N_FRAMES"]) == (32, 128, 72, 17)
    assert config["BLOCK_S"] * config["HEADS"] * 32 * 128 <= 4096  # (position, head) pairs x F_PAD x D_PAD
    wide = launch_config(torch.empty(2, 5, 3, 3, 16), 2)  # 3 heads: a group of 4 with one padding head
    assert (wide["HEADS"], wide["BLOCK_S"]) == (4, 4)
    assert config["PRECISION"] == "ieee"  # fp32 dots stay fp32 (TF32 would lose the fp32 tolerance)


def test_saves_qkv_once_and_returns_one_gradient_buffer(device):
    qkv = make_qkv(2, 3, 4, 2, 16, torch.float32, device)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = temporal_attention(qkv, 3)
    assert [tuple(t.shape) for t in saved] == [(6, 4, 3, 2, 16), (6, 4, 2, 16), (6, 4, 2)]  # qkv, out, lse
    assert saved[0].data_ptr() == qkv.data_ptr()  # the projection's output itself, not a copy
    out.sum().backward()
    assert qkv.grad.shape == qkv.shape


@pytest.mark.parametrize("shape,frames,match", [
    ((6, 4, 2, 2, 16), 3, r"qkv must be \[B\*F, S, 3, heads, dim\], got \(6, 4, 2, 2, 16\)"),
    ((6, 4, 3, 2, 16), 4, r"frames=4 must be in 1..64 and divide qkv's 6 rows"),
    ((65, 1, 3, 1, 16), 65, r"frames=65 must be in 1..64"),
])
def test_bad_shapes_are_named(shape, frames, match):
    with pytest.raises(ValueError, match=match):
        temporal_attention(torch.zeros(shape), frames)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol", DTYPES[1:], ids=DTYPE_IDS[1:])
def test_latte_xl_shape_on_gpu(dtype, atol):
    """Latte-XL/2's temporal attention (16 frames, 16 heads x 72) at 64 positions, compiled for the GPU."""
    check(2, 16, 64, 16, 72, dtype, atol, torch.device("cuda"))
