"""Triton layernorm_modulate (its custom op) vs the torch reference: forward and every gradient (flash-attention's
error rule)."""
import pytest
import torch

from ristretto.kernels import reference
from ristretto.kernels.testing import assert_matches_reference
from ristretto.kernels.custom_ops import layernorm_modulate

# (dtype, atol): fp32 must be tight; low precision passes when err <= 2 * (reference's own low-precision err) + atol
DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 1e-3), (torch.float16, 1e-4)]


def make_inputs(n, s, d, groups, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype).requires_grad_()

    # an offset mean checks that the variance is computed around the mean
    x = (torch.randn(n, s, d, generator=gen) * 2 + 0.5).to(device=device, dtype=dtype).requires_grad_()
    return x, randn(groups, d, scale=0.5), randn(groups, d, scale=0.5)


@pytest.mark.parametrize("dtype,atol", DTYPES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize(
    "n,s,d,groups",
    [
        (6, 5, 100, 6),  # M = N: one vector per row (spatial layout, per sample-and-frame)
        (6, 7, 216, 3),  # M < N: groups of 2 rows (spatial layout, per sample)
        (4, 3, 1152, 1),  # M = 1, Latte's D
        (3, 37, 72, 3),  # token count not a multiple of any block
        (2, 1, 1, 2),  # D = 1: LN of one feature is 0, output = shift
        (2, 333, 64, 1),  # 666 rows: several row tiles per backward program and several programs per group
    ],
)
def test_layernorm_modulate_matches_reference(n, s, d, groups, dtype, atol, device):
    inputs = make_inputs(n, s, d, groups, dtype, device)
    assert_matches_reference(layernorm_modulate, reference.layernorm_modulate, inputs, atol)


def test_layernorm_modulate_distinct_shift_and_scale_groups(device):
    x, shift, _ = make_inputs(4, 5, 48, 2, torch.float32, device)
    scale = torch.randn(4, 48, device=device, requires_grad=True)  # per row while shift is per pair of rows
    assert_matches_reference(layernorm_modulate, reference.layernorm_modulate, (x, shift, scale), 1e-5)


def test_non_contiguous_inputs(device):
    x, shift, scale = make_inputs(5, 6, 40, 5, torch.float32, device)
    x_t = x.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # same values, strided
    adaln = torch.randn(5, 3 * 40, device=device)
    shift_view, scale_view = adaln[:, :40].requires_grad_(), adaln[:, 80:].requires_grad_()  # chunk()-style views
    assert not x_t.is_contiguous() and not shift_view.is_contiguous()
    assert_matches_reference(layernorm_modulate, reference.layernorm_modulate, (x_t, shift_view, scale_view), 1e-5)


def test_checker_rejects_a_wrong_group_rule(device):
    """The comparison must fail for a kernel that broadcasts the vectors the wrong way (row n uses n % M)."""
    x, shift, scale = make_inputs(4, 3, 32, 2, torch.float32, device)

    def interleaved(x, shift, scale):
        return layernorm_modulate(x, shift.repeat(2, 1), scale.repeat(2, 1))  # group n % 2 instead of n // 2

    with pytest.raises(AssertionError):
        assert_matches_reference(interleaved, reference.layernorm_modulate, (x, shift, scale), 1e-5)


def test_bad_shapes_name_the_argument(device):
    x, shift, scale = make_inputs(4, 3, 32, 4, torch.float32, device)
    with pytest.raises(ValueError, match="shift"):
        layernorm_modulate(x, shift[:3], scale)
    with pytest.raises(ValueError, match="scale"):
        layernorm_modulate(x, shift, scale[:, :16])
    with pytest.raises(ValueError, match="x"):
        layernorm_modulate(x[0], shift, scale)


def test_output_dtype_follows_x_and_statistics_are_fp32(device):
    x, shift, scale = make_inputs(2, 64, 256, 2, torch.bfloat16, device)
    with torch.no_grad():
        x += 300.0  # a large mean: bf16 statistics would lose the centred signal entirely
        out = layernorm_modulate(x, shift, scale)
    assert out.dtype == torch.bfloat16
    exact = reference.layernorm_modulate(x, shift, scale, upcast=True)
    assert (out.double() - exact).abs().max().item() < 0.1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol", DTYPES, ids=lambda v: str(v).replace("torch.", ""))
def test_layernorm_modulate_cuda_latte_sizes(dtype, atol):
    inputs = make_inputs(2 * 16, 256, 1152, 2, dtype, torch.device("cuda"))
    assert_matches_reference(layernorm_modulate, reference.layernorm_modulate, inputs, atol)


def test_triton_kernel_set_has_the_reference_signatures():
    import inspect  # noqa: PLC0415

    from ristretto.kernels.registry import kernel_set  # noqa: PLC0415

    triton_set = kernel_set("triton")
    for op in ("patch_embed", "layernorm_modulate", "gate_residual"):
        expected = [p for name, p in inspect.signature(getattr(reference, op)).parameters.items() if name != "upcast"]
        assert list(inspect.signature(getattr(triton_set, op)).parameters.values()) == expected, op
