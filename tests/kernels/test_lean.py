"""The memory-lean torch ops (kernels/lean.py, kernels/gelu_mlp.py): the reference's values and gradients, while
saving for backward only their inputs (what the Triton kernels save)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ristretto.kernels import lean, reference
from ristretto.kernels.gelu_mlp import gelu_mlp
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
    assert_matches_reference(lean.gate_residual_layernorm_modulate, reference.gate_residual_layernorm_modulate,
                             (x, gate, y, shift, scale), atol)


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


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gelu_mlp_equals_the_plain_composition_and_keeps_one_hidden(precision):
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(40, 160), nn.Linear(160, 40)
    x = torch.randn(3, 11, 40, requires_grad=True)
    dout = torch.randn(3, 11, 40)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def run(fn):
        params = [x, *fc1.parameters(), *fc2.parameters()]
        with autocast:
            out = fn(x)
        return [out.float(), *torch.autograd.grad(out, params, dout.to(out.dtype))]

    plain = run(lambda t: fc2(F.gelu(fc1(t), approximate="tanh")))
    lean_out = run(lambda t: gelu_mlp(t, fc1, fc2))
    fc1d, fc2d = nn.Linear(40, 160).double(), nn.Linear(160, 40).double()
    fc1d.load_state_dict(fc1.state_dict()), fc2d.load_state_dict(fc2.state_dict())
    xd = x.detach().double().requires_grad_()
    out_d = fc2d(F.gelu(fc1d(xd), approximate="tanh"))
    exact = [out_d, *torch.autograd.grad(out_d, [xd, *fc1d.parameters(), *fc2d.parameters()], dout.double())]
    atol = 1e-6 if precision == "fp32" else 1e-3
    for got, same, ref in zip(lean_out, plain, exact):
        assert got.dtype == same.dtype
        err, err_pt = (got.double() - ref).abs().max().item(), (same.double() - ref).abs().max().item()
        assert err <= 2 * err_pt + atol, (err, err_pt)
    params = [*fc1.parameters(), *fc2.parameters()]
    with autocast:
        kept = saved_bytes(lambda: gelu_mlp(x, fc1, fc2), params)
        kept_plain = saved_bytes(lambda: fc2(F.gelu(fc1(x), approximate="tanh")), params)
    element = 4 if precision == "fp32" else 2
    hidden, weights = 3 * 11 * 160 * element, 2 * 40 * 160 * element
    # one [tokens, 4D] hidden fewer, and (bf16) none of autocast's weight copies
    assert kept_plain - kept == hidden + (weights if precision == "bf16" else 0)
