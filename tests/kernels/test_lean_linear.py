"""The attention branch's lean ops (kernels/lean_linear.py): the plain composition's values and every gradient
(flash-attention's rule: error at most twice the same-precision reference's, against fp64), with both kernel sets,
fp32 and bf16 autocast, odd shapes and a second row layout, while keeping only what the matmuls need."""
import copy

import pytest
import torch
from torch import nn

from ristretto.kernels import reference
from ristretto.kernels.lean_linear import gated_projection, modulated_linear
from ristretto.kernels.registry import kernel_set
from ristretto.model.attention import frame_sequence_layout

from .test_lean import saved_bytes

KERNELS = ["torch", pytest.param("triton", marks=pytest.mark.filterwarnings("ignore"))]
SHAPES = [(6, 11, 40, 3, 24), (3, 37, 72, 1, 216), (4, 1, 8, 4, 5)]  # N, S, D, M (vector groups), K (linear width)


def kernels_or_skip(name: str):
    if name == "triton":
        pytest.importorskip("triton")
    return kernel_set(name)


def leaves(n, s, d, groups, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, s, d, generator=gen) * 2 + 0.5).requires_grad_()
    vectors = [(torch.randn(groups, d, generator=gen) * 0.5).requires_grad_() for _ in range(3)]
    return x, *vectors


def check_against_plain(fused, plain, linear: nn.Linear, inputs, dout, precision: str):
    """fused vs plain (same precision) vs plain in fp64 with the reference ops: outputs and every gradient."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def run(fn, layer, tensors):
        with autocast:
            out = fn(*tensors, layer)
        return [out, *torch.autograd.grad(out, [*tensors, *layer.parameters()], dout.to(out.dtype))]

    got, same = run(fused, linear, inputs), run(plain, linear, inputs)
    exact_linear = copy.deepcopy(linear).double()
    with torch.autocast("cpu", enabled=False):
        exact = run(lambda *a: plain(*a, ops=reference), exact_linear,
                    [t.detach().double().requires_grad_() for t in inputs])
    atol = 1e-5 if precision == "fp32" else 1e-3
    for index, (x_k, x_pt, x_ref) in enumerate(zip(got, same, exact)):
        assert (x_k.shape, x_k.dtype) == (x_pt.shape, x_pt.dtype), index
        err, err_pt = (x_k.double() - x_ref).abs().max().item(), (x_pt.double() - x_ref).abs().max().item()
        assert err <= 2 * err_pt + atol, (index, err, err_pt)


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("n,s,d,groups,width", SHAPES)
def test_modulated_linear_equals_the_plain_composition(n, s, d, groups, width, precision, kernels):
    ops = kernels_or_skip(kernels)
    torch.manual_seed(0)
    linear = nn.Linear(d, width)
    x, shift, scale, _ = leaves(n, s, d, groups)

    def plain(x, shift, scale, layer, ops=ops):
        return layer(ops.layernorm_modulate(x, shift, scale, 1e-6))

    dout = torch.randn(n, s, width)
    check_against_plain(lambda *a: modulated_linear(*a, ops), plain, linear, [x, shift, scale], dout, precision)


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("n,s,d,groups,width", SHAPES)
def test_gated_projection_equals_the_plain_composition(n, s, d, groups, width, precision, kernels):
    ops = kernels_or_skip(kernels)
    torch.manual_seed(0)
    linear = nn.Linear(width, d)
    residual, gate, _, _ = leaves(n, s, d, groups)
    a = torch.randn(n, s, width, generator=torch.Generator().manual_seed(2)).requires_grad_()

    def plain(residual, gate, a, layer, ops=ops):
        return ops.gate_residual(residual, gate, layer(a))

    dout = torch.randn(n, s, d)
    check_against_plain(lambda *args: gated_projection(*args, ops), plain, linear, [residual, gate, a], dout,
                        precision)


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gated_projection_from_frame_sequences(precision, kernels):
    """a in the frame-sequence layout [B*S, F, K] (temporal attention through a backend), the residual in the
    spatial rows [B*F, S, D]: the same as moving the projection's output to the rows first."""
    ops = kernels_or_skip(kernels)
    batch, frames, tokens, d, width = 2, 5, 7, 24, 16
    layout = frame_sequence_layout(frames, tokens)
    torch.manual_seed(0)
    linear = nn.Linear(width, d)
    residual, gate, _, _ = leaves(batch * frames, tokens, d, batch)
    a = torch.randn(batch * tokens, frames, width, generator=torch.Generator().manual_seed(2)).requires_grad_()

    def plain(residual, gate, a, layer, ops=ops):
        return ops.gate_residual(residual, gate, layout.to_rows(layer(a)))

    dout = torch.randn(batch * frames, tokens, d)
    check_against_plain(lambda *args: gated_projection(*args, ops, layout), plain, linear, [residual, gate, a], dout,
                        precision)


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_ops_keep_only_what_their_matmuls_need(precision, kernels):
    ops = kernels_or_skip(kernels)
    torch.manual_seed(0)
    qkv, proj = nn.Linear(40, 120), nn.Linear(40, 40)
    x, shift, scale, gate = leaves(6, 11, 40, 3)
    a = torch.randn(6, 11, 40).requires_grad_()
    element = 4 if precision == "fp32" else 2
    params = [*qkv.parameters(), *proj.parameters(), shift, scale, gate]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        a = a.to(torch.bfloat16 if precision == "bf16" else torch.float32)  # the attention's output dtype
        assert saved_bytes(lambda: modulated_linear(x, shift, scale, qkv, ops), params) == x.numel() * 4
        assert saved_bytes(lambda: gated_projection(x, gate, a, proj, ops), params) == a.numel() * element
        plain = saved_bytes(lambda: ops.gate_residual(x, gate, proj(a)), params)
    assert plain >= 2 * a.numel() * element  # the plain path also keeps the projection's output


def test_fused_ops_name_bad_shapes():
    ops = kernel_set("torch")
    x, shift, scale, gate = leaves(6, 5, 8, 4)  # 4 groups do not divide 6 rows
    with pytest.raises(ValueError, match=r"modulated_linear: expected .* M dividing N, got \(6, 5, 8\) and \(4, 8\)"):
        modulated_linear(x, shift, scale, nn.Linear(8, 8), ops)
    with pytest.raises(ValueError, match=r"gated_projection: expected"):
        gated_projection(x, gate, x, nn.Linear(8, 8), ops)


def test_gate_gradient_pieces_in_chunks_equal_one_batched_call(monkeypatch):
    """Large layers compute the per-group pieces a few groups at a time (a bounded workspace): same gradients."""
    from ristretto.kernels import lean_linear  # noqa: PLC0415

    gen = torch.Generator().manual_seed(3)
    dout, act = torch.randn(6, 5, 8, generator=gen), torch.randn(30, 12, generator=gen)
    gate, weight, bias = torch.randn(3, 8, generator=gen), torch.randn(8, 12, generator=gen), torch.randn(8)
    whole = lean_linear.gated_linear_backward(dout, act, gate, weight, bias, torch.float32)
    monkeypatch.setattr(lean_linear, "GROUP_PIECES_ELEMENTS", 2 * weight.numel())  # 2 groups, then 1
    chunked = lean_linear.gated_linear_backward(dout, act, gate, weight, bias, torch.float32)
    for got, expected in zip(chunked, whole):
        torch.testing.assert_close(got, expected)
    y_grad = (dout.reshape(3, -1, 8) * gate[:, None]).reshape(-1, 8)  # autograd's dgate, from the output itself
    expected_dgate = ((dout.reshape(3, -1, 8)) * (act @ weight.t() + bias).reshape(3, -1, 8)).sum(1)
    torch.testing.assert_close(whole[1], expected_dgate, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(whole[0], y_grad @ weight)
