"""Triton gate_residual (its custom op; the row kernels with GATED_RESIDUAL on) vs the torch reference, every
gradient."""
import pytest
import torch

from ristretto.kernels import reference
from ristretto.kernels.testing import assert_matches_reference
from ristretto.kernels.custom_ops import gate_residual

# (dtype, atol): fp32 must be tight; low precision passes when err <= 2 * (reference's own low-precision err) + atol
DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 1e-3), (torch.float16, 1e-4)]
SHAPES = [  # (N, S, D, gate groups)
    (6, 5, 100, 6),  # M = N
    (6, 7, 216, 3),  # M < N
    (4, 3, 1152, 1),  # M = 1, Latte's D
    (3, 37, 72, 3),  # token count not a multiple of any block
    (2, 1, 1, 2),  # D = 1
    (2, 333, 64, 1),  # 666 rows: several row tiles per backward program and several programs per group
]


def make_inputs(n, s, d, gate_groups, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, offset=0.0):
        return (torch.randn(*shape, generator=gen) * scale + offset).to(device=device, dtype=dtype).requires_grad_()

    return randn(n, s, d, scale=2, offset=0.5), randn(gate_groups, d), randn(n, s, d)


@pytest.mark.parametrize("dtype,atol", DTYPES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("n,s,d,gate_groups", SHAPES)
def test_gate_residual_matches_reference(n, s, d, gate_groups, dtype, atol, device):
    assert_matches_reference(gate_residual, reference.gate_residual, make_inputs(n, s, d, gate_groups, dtype, device),
                             atol)


def test_non_contiguous_inputs(device):
    residual, _, y = make_inputs(4, 6, 40, 4, torch.float32, device)
    y_t = y.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    gate_view = torch.randn(4, 80, device=device)[:, 40:].requires_grad_()  # a chunk() of an adaLN projection
    assert not y_t.is_contiguous() and not gate_view.is_contiguous()
    assert_matches_reference(gate_residual, reference.gate_residual, (residual, gate_view, y_t), 1e-5)


def test_checker_rejects_a_wrong_gradient(device):
    """A kernel whose dgate misses the per-group sum must fail the comparison."""
    residual, gate, y = make_inputs(4, 3, 32, 2, torch.float32, device)

    class HalfGateGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, gate):
            return gate.clone()

        @staticmethod
        def backward(ctx, dgate):
            return dgate * 0.5

    def wrong(residual, gate, y):
        return gate_residual(residual, HalfGateGrad.apply(gate), y)

    with pytest.raises(AssertionError, match="tensor 2"):
        assert_matches_reference(wrong, reference.gate_residual, (residual, gate, y), 1e-5)


def test_bad_shapes_name_the_argument(device):
    residual, gate, y = make_inputs(4, 3, 32, 4, torch.float32, device)
    with pytest.raises(ValueError, match="gate"):
        gate_residual(residual, gate[:3], y)
    with pytest.raises(ValueError, match="y"):
        gate_residual(residual, gate, y[:, :2])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol", DTYPES, ids=lambda v: str(v).replace("torch.", ""))
def test_gate_residual_cuda_latte_sizes(dtype, atol):
    inputs = make_inputs(2 * 16, 256, 1152, 2, dtype, torch.device("cuda"))
    assert_matches_reference(gate_residual, reference.gate_residual, inputs, atol)
