"""The memory-lean torch ops (kernels/lean.py, kernels/gelu_mlp.py): the reference's values and gradients, while
saving for backward only their inputs (what the Triton kernels save)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ristretto.kernels import lean, reference
from ristretto.kernels.gelu_mlp import gated_mlp
from ristretto.kernels.registry import kernel_set
from ristretto.kernels.testing import assert_matches_reference

DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 1e-3)]


def saved_bytes(run, parameters=()) -> int:
    """Distinct storages autograd keeps while run() executes, parameters excluded (they exist anyway)."""
    excluded = {p.untyped_storage().data_ptr() for p in parameters}
    storages = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in excluded:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storages.values())


def activations(n, s, d, groups, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, s, d, generator=gen) * 2 + 0.5).to(dtype).requires_grad_()
    vectors = [(torch.randn(groups, d, generator=gen) * 0.5).to(dtype).requires_grad_() for _ in range(3)]
    y = torch.randn(n, s, d, generator=gen).to(dtype).requires_grad_()
    return x, y, *vectors


@pytest.mark.parametrize("dtype,atol", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("n,s,d,groups", [(6, 7, 48, 3), (3, 37, 72, 1), (2, 1, 1, 2)])
def test_lean_ops_match_reference(n, s, d, groups, dtype, atol):
    x, y, shift, scale, gate = activations(n, s, d, groups, dtype)
    assert_matches_reference(lean.layernorm_modulate, reference.layernorm_modulate, (x, shift, scale), atol)
    assert_matches_reference(lean.gate_residual, reference.gate_residual, (x, gate, y), atol)


def test_layernorm_modulate_saves_only_its_input_and_emits_the_autocast_dtype():
    x, _, shift, scale, _ = activations(4, 64, 128, 2, torch.float32)
    plain = saved_bytes(lambda: reference.layernorm_modulate(x, shift, scale))
    kept = saved_bytes(lambda: lean.layernorm_modulate(x, shift, scale))
    vectors = shift.numel() * 4 * 2
    assert kept == x.numel() * 4 + vectors  # x itself, no normalised copy
    assert plain >= 2 * x.numel() * 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lean.layernorm_modulate(x, shift, scale)
        assert out.dtype == torch.bfloat16  # what the next linear computes in: no cast, no second copy kept
        assert lean.gate_residual(x, shift, out).dtype == torch.float32  # the residual keeps its dtype


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gated_mlp_equals_the_plain_composition_and_keeps_x_and_one_hidden(precision, kernels):
    if kernels == "triton":
        pytest.importorskip("triton")
    ops = kernel_set(kernels)
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(40, 160), nn.Linear(160, 40)
    x, _, shift, scale, gate = activations(6, 11, 40, 3, torch.float32)  # 3 groups of 2 rows
    dout = torch.randn(6, 11, 40)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    leaves = [x, shift, scale, gate]

    def run(fn, layers, inputs):
        params = [*layers[0].parameters(), *layers[1].parameters()]
        with autocast:
            out = fn(*inputs, *layers)
        return [out, *torch.autograd.grad(out, [*inputs, *params], dout.to(out.dtype))]

    def plain(x, shift, scale, gate, fc1, fc2, ops=ops):
        hidden = F.gelu(fc1(ops.layernorm_modulate(x, shift, scale, 1e-6)), approximate="tanh")
        return ops.gate_residual(x, gate, fc2(hidden))

    got = run(lambda *a: gated_mlp(*a, ops), (fc1, fc2), leaves)
    same = run(plain, (fc1, fc2), leaves)
    fc1d, fc2d = copy.deepcopy(fc1).double(), copy.deepcopy(fc2).double()
    with torch.autocast("cpu", enabled=False):
        exact = run(lambda *a: plain(*a, ops=reference), (fc1d, fc2d),
                    [t.detach().double().requires_grad_() for t in leaves])
    atol = 1e-5 if precision == "fp32" else 1e-3
    for index, (x_k, x_pt, x_ref) in enumerate(zip(got, same, exact)):
        assert x_k.dtype == x_pt.dtype, index
        err, err_pt = (x_k.double() - x_ref).abs().max().item(), (x_pt.double() - x_ref).abs().max().item()
        assert err <= 2 * err_pt + atol, (index, err, err_pt)
    params = [*fc1.parameters(), *fc2.parameters(), shift, scale, gate]
    with autocast:
        kept = saved_bytes(lambda: gated_mlp(x, shift, scale, gate, fc1, fc2, ops), params)
        kept_plain = saved_bytes(lambda: plain(x, shift, scale, gate, fc1, fc2), params)
    element = 4 if precision == "fp32" else 2
    assert kept == x.numel() * 4 + 6 * 11 * 160 * element  # the fp32 input x and the GELU input, nothing else
    assert kept_plain - kept >= 6 * 11 * (160 + 40) * element  # the plain path also keeps GELU's and fc2's outputs
