"""Triton patch_embed (its custom op) vs the torch reference (and nn.Conv2d): forward and the grads of x, weight and
bias."""
import pytest
import torch
import torch.nn.functional as F

from ristretto.kernels import reference
from ristretto.kernels.testing import assert_matches_reference
from ristretto.kernels.custom_ops import patch_embed

# (dtype, atol): fp32 must be tight; low precision passes when err <= 2 * (reference's own low-precision err) + atol
DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 1e-3), (torch.float16, 1e-4)]


def make_inputs(n, c, h, w, patch, d, dtype, device, with_pos=True, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, grad=True):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype).requires_grad_(grad)

    x = randn(n, c, h, w)
    weight = randn(d, c, patch, patch, scale=(c * patch * patch) ** -0.5)
    pos = randn((h // patch) * (w // patch), d, grad=False) if with_pos else None  # a fixed buffer
    return x, weight, randn(d, scale=0.1), pos


def run_patch_embed(kernel):
    """(x, weight, bias, pos) -> tokens with the patch size bound, so the checker sees tensors only."""
    return lambda patch: (lambda x, weight, bias, pos=None: kernel(x, weight, bias, pos, patch))


@pytest.mark.parametrize("dtype,atol", DTYPES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize(
    "n,c,h,w,patch,d,with_pos",
    [
        (2, 3, 5, 7, 1, 100, True),  # p = 1: K = 3, padded up to tl.dot's 16
        (3, 4, 6, 10, 2, 72, True),  # Latte: C = 4, p = 2 -> K = 16; 45 tokens, not a block multiple
        (2, 3, 8, 12, 4, 216, False),  # p = 4: K = 48; no position table
        (1, 4, 16, 18, 2, 1152, True),  # Latte's D, 72 tokens -> two row blocks
        (2, 4, 20, 20, 2, 16, True),  # 200 rows: the weight grad splits rows over programs, each looping tiles
        (1, 8, 8, 8, 4, 40, True),  # K = 128: two K blocks (the bias grad must come from one of them only)
    ],
)
def test_patch_embed_matches_reference(n, c, h, w, patch, d, with_pos, dtype, atol, device):
    x, weight, bias, pos = make_inputs(n, c, h, w, patch, d, dtype, device, with_pos)
    inputs = (x, weight, bias) if pos is None else (x, weight, bias, pos)
    assert_matches_reference(run_patch_embed(patch_embed)(patch), run_patch_embed(reference.patch_embed)(patch),
                             inputs, atol)


def test_reference_equals_conv2d(device):
    """The reference's patch order must be Conv2d's, or a checkpoint's weights would embed scrambled patches."""
    x, weight, bias, pos = make_inputs(2, 4, 8, 6, 2, 32, torch.float64, device)
    conv = F.conv2d(x, weight, bias, stride=2).flatten(2).transpose(1, 2) + pos
    torch.testing.assert_close(reference.patch_embed(x, weight, bias, pos, 2), conv)


def test_channels_last_input_read_through_strides(device):
    x, weight, bias, pos = make_inputs(2, 4, 8, 6, 2, 40, torch.float32, device)
    x_cl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    assert not x_cl.is_contiguous()
    assert_matches_reference(run_patch_embed(patch_embed)(2), run_patch_embed(reference.patch_embed)(2),
                             (x_cl, weight, bias, pos), 1e-5)


def test_trainable_pos_embed_gets_a_gradient(device):
    x, weight, bias, pos = make_inputs(2, 3, 4, 4, 2, 24, torch.float32, device)
    pos = pos.detach().unsqueeze(0).requires_grad_()  # DiT's [1, T, D] parameter layout
    assert_matches_reference(run_patch_embed(patch_embed)(2), run_patch_embed(reference.patch_embed)(2),
                             (x, weight, bias, pos), 1e-5)


def test_checker_rejects_a_transposed_patch(device):
    """A kernel reading patches in (C, W, H) order must fail: the comparison can see patch-order bugs."""
    x, weight, bias, pos = make_inputs(2, 4, 8, 8, 2, 24, torch.float32, device)

    def transposed(x, weight, bias, pos):
        return patch_embed(x, weight.transpose(2, 3), bias, pos, 2)

    with pytest.raises(AssertionError):
        assert_matches_reference(transposed, run_patch_embed(reference.patch_embed)(2), (x, weight, bias, pos), 1e-5)


def test_bad_shapes_name_the_argument(device):
    x, weight, bias, pos = make_inputs(1, 4, 8, 8, 2, 24, torch.float32, device)
    with pytest.raises(ValueError, match="x: H=8 and W=8 must be multiples of patch=3"):
        patch_embed(x, weight, bias, pos, 3)
    with pytest.raises(ValueError, match="weight"):
        patch_embed(x, weight[:, :3], bias, pos, 2)
    with pytest.raises(ValueError, match="bias"):
        patch_embed(x, weight, bias[:10], pos, 2)
    with pytest.raises(ValueError, match="pos_embed"):
        patch_embed(x, weight, bias, pos[:5], 2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol", DTYPES, ids=lambda v: str(v).replace("torch.", ""))
def test_patch_embed_cuda_latte_sizes(dtype, atol):
    x, weight, bias, pos = make_inputs(2 * 16, 4, 32, 32, 2, 1152, dtype, torch.device("cuda"))
    assert_matches_reference(run_patch_embed(patch_embed)(2), run_patch_embed(reference.patch_embed)(2),
                             (x, weight, bias, pos), atol)
