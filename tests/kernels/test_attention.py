"""Every attention backend equals sdpa-math: self and masked cross attention, odd head dims and lengths, fwd and bwd."""
import math
import sys
import types

import pytest
import torch

from ristretto.kernels import attention as attn
from ristretto.kernels.attention import attention_backend

CPU_BACKENDS = ["sdpa", "sdpa-flash", "sdpa-math"]  # the torch kernels that run on CPU

# (N, Sq, Sk, heads, dim, masked): self attention, masked cross attention, Latte's head dim 72, odd lengths
CASES = [
    (3, 17, 17, 2, 72, False),
    (4, 13, 9, 3, 40, True),
    (2, 1, 5, 1, 8, True),
    (2, 33, 7, 2, 72, True),
]


def make_inputs(n, sq, sk, heads, dim, masked, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(n, s, heads, dim, generator=gen).to(device, dtype) for s in (sq, sk, sk))
    mask = None
    if masked:  # each row keeps a different number of leading tokens (>= 1), like padded captions
        lengths = torch.randint(1, sk + 1, (n,), generator=gen)
        lengths[0] = sk
        mask = (torch.arange(sk)[None, :] < lengths[:, None]).to(device)
    return q, k, v, mask


def forward_backward(fn, q, k, v, mask, grad_out):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, mask)
    out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("name", CPU_BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_cpu_backend_equals_math(name, case):
    q, k, v, mask = make_inputs(*case)
    grad_out = torch.randn_like(q)
    expected = forward_backward(attention_backend("sdpa-math"), q, k, v, mask, grad_out)
    got = forward_backward(attention_backend(name), q, k, v, mask, grad_out)
    assert got[0].shape == q.shape
    for what, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name} {what}: {m}")


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_masked_caption_equals_trimmed_caption(name):
    q, k, v, mask = make_inputs(3, 11, 9, 2, 72, masked=True)
    fn = attention_backend(name)
    out = fn(q, k, v, mask)
    for i, length in enumerate(mask.sum(1).tolist()):
        trimmed = fn(q[i:i + 1], k[i:i + 1, :length], v[i:i + 1, :length])
        torch.testing.assert_close(out[i:i + 1], trimmed, atol=2e-5, rtol=1e-4)
    assert mask.sum(1).min() < mask.shape[1]  # the test really has padding


def test_pack_varlen_offsets_and_keys():
    q, k, v, mask = make_inputs(3, 5, 6, 2, 8, masked=True)
    mask[2] = torch.tensor([True, False, True, False, False, True])  # not a prefix: packing must gather
    packed = attn.pack_varlen(q, k, v, mask)
    lengths = mask.sum(1).tolist()
    assert packed.max_seqlen_k == 6 and packed.k.shape == (3 * 6, 2, 8)  # sized from the shape, not the mask
    assert packed.cu_seqlens_k.tolist() == [0, lengths[0], lengths[0] + lengths[1], sum(lengths)]
    assert packed.cu_seqlens_q.tolist() == [0, 5, 10, 15] and packed.cu_seqlens_q.dtype == torch.int32
    torch.testing.assert_close(packed.k[:sum(lengths)], k[mask])
    torch.testing.assert_close(packed.v[sum(lengths[:2]):sum(lengths)], v[2, [0, 2, 5]])
    assert not packed.k[sum(lengths):].any()  # dropped keys: zero


def test_masked_packing_never_asks_the_host(monkeypatch):
    """No .tolist()/.item()/bool() on a tensor: on a GPU each would wait for the device."""
    q, k, v, mask = make_inputs(3, 5, 6, 2, 8, masked=True)
    for name in ("tolist", "item", "__bool__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, name=name: pytest.fail(f"host sync: Tensor.{name}"))
    attn.pack_varlen(q, k, v, mask)
    attn.additive_mask(mask, 2, 5, torch.float32)


@pytest.mark.gpu
def test_masked_packing_has_no_cuda_sync():
    q, k, v, mask = make_inputs(3, 5, 6, 2, 8, masked=True, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        attn.pack_varlen(q, k, v, mask)
        attn.additive_mask(mask, 2, 5, torch.bfloat16)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match=r"model.attention_backend: unknown backend 'flash'.*'sdpa-math'"):
        attention_backend("flash")


@pytest.mark.parametrize("name, package", [("fa4", "flash-attn-4"), ("fa3", "flash-attn-3"),
                                           ("fa2", "flash-attn"), ("xformers", "xformers")])
def test_missing_package_is_one_line_naming_it(monkeypatch, name, package):
    monkeypatch.setitem(sys.modules, attn.OPTIONAL_PACKAGES[name][0], None)  # makes the import fail
    with pytest.raises(ImportError) as error:
        attention_backend(name)
    message = str(error.value)
    assert message.startswith(f"model.attention_backend={name!r} needs {package}: ") and "\n" not in message
    assert error.value.__cause__ is None and error.value.__suppress_context__


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the efficient kernel exists")
def test_forced_kernel_that_cannot_run_names_sdpa():
    q, k, v, mask = make_inputs(*CASES[1])
    with pytest.raises(RuntimeError, match=r"'sdpa-efficient'.*EFFICIENT_ATTENTION.*use 'sdpa'"):
        attention_backend("sdpa-efficient")(q, k, v, mask)


# ---- the flash / xformers wrappers, driven through pure-torch stand-ins of their packages ----

def reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale):
    """What flash_attn_varlen_func computes, one sequence at a time, in fp32."""
    assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
    assert max_seqlen_k >= int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max())  # an upper bound is what flash needs
    outs = []
    for i in range(len(cu_seqlens_q) - 1):
        qs, ks, vs = (t[a:b].float() for t, a, b in ((q, *cu_seqlens_q[i:i + 2].tolist()),
                                                    (k, *cu_seqlens_k[i:i + 2].tolist()),
                                                    (v, *cu_seqlens_k[i:i + 2].tolist())))
        weights = torch.softmax(torch.einsum("qhd,khd->hqk", qs, ks) * softmax_scale, dim=-1)
        outs.append(torch.einsum("hqk,khd->qhd", weights, vs))
    return torch.cat(outs).to(q.dtype)


def fake_flash_module(returns_lse: bool):
    """A stand-in for flash_attn / flash_attn_interface / flash_attn.cute; FA3/FA4 may return (out, lse)."""
    def wrap(out):
        return (out, None) if returns_lse else out

    def flash_attn_func(q, k, v, softmax_scale):
        n, sq, sk = q.shape[0], q.shape[1], k.shape[1]
        cu_q = torch.arange(0, (n + 1) * sq, sq, dtype=torch.int32)
        cu_k = torch.arange(0, (n + 1) * sk, sk, dtype=torch.int32)
        flat = (t.reshape(-1, *t.shape[2:]) for t in (q, k, v))
        return wrap(reference_varlen(*flat, cu_q, cu_k, sq, sk, softmax_scale).view_as(q))

    def flash_attn_varlen_func(q, k, v, **kwargs):
        return wrap(reference_varlen(q, k, v, **kwargs))

    def flash_attn_qkvpacked_func(qkv, softmax_scale):
        calls.append(tuple(qkv.shape))
        return flash_attn_func(*qkv.unbind(2), softmax_scale=softmax_scale)

    calls = []
    return types.SimpleNamespace(flash_attn_func=flash_attn_func, flash_attn_varlen_func=flash_attn_varlen_func,
                                 flash_attn_qkvpacked_func=flash_attn_qkvpacked_func, packed_calls=calls)


def fake_xformers_ops():
    def memory_efficient_attention(q, k, v, attn_bias=None):
        assert attn_bias is None or attn_bias.shape == (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
        if attn_bias is not None:  # xformers wants the bias rows 16-byte aligned: the storage is padded
            assert attn_bias.untyped_storage().nbytes() // attn_bias.element_size() % 8 == 0
        scores = torch.einsum("nqhd,nkhd->nhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
        if attn_bias is not None:
            scores = scores + attn_bias.float()
        return torch.einsum("nhqk,nkhd->nqhd", scores.softmax(-1), v.float()).to(q.dtype)

    return types.SimpleNamespace(memory_efficient_attention=memory_efficient_attention)


@pytest.mark.parametrize("name", ["fa4", "fa3", "fa2", "xformers"])
@pytest.mark.parametrize("case", CASES)
def test_optional_backend_wrapper_equals_math(monkeypatch, name, case):
    fake = fake_xformers_ops() if name == "xformers" else fake_flash_module(returns_lse=name != "fa2")
    monkeypatch.setitem(sys.modules, attn.OPTIONAL_PACKAGES[name][0], fake)
    fn = attention_backend(name)
    if case[4] % 8 and name in ("fa3", "fa4"):
        pytest.skip("FA3/FA4 need head dims that are multiples of 8 (checked in its own test)")
    q, k, v, mask = make_inputs(*case, dtype=torch.bfloat16)
    grad_out = torch.randn_like(q)
    got = forward_backward(fn, q, k, v, mask, grad_out)
    expected = forward_backward(attention_backend("sdpa-math"), *(t.float() for t in (q, k, v)), mask,
                                grad_out.float())
    for what, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, atol=2e-2, rtol=2e-2, msg=lambda m: f"{name} {what}: {m}")


@pytest.mark.parametrize("name", ["fa2", "fa3", "sdpa"])
def test_packed_self_attention_equals_unbound(monkeypatch, name):
    """fa2/fa3 get qkv whole (their backward writes one dqkv); sdpa gets unbound views of it."""
    fake = fake_flash_module(returns_lse=name == "fa3")
    if name != "sdpa":
        monkeypatch.setitem(sys.modules, attn.OPTIONAL_PACKAGES[name][0], fake)
    qkv = torch.randn(2, 9, 3, 2, 16, dtype=torch.bfloat16, requires_grad=True)
    got = attn.packed_self_attention(attention_backend(name), qkv)
    expected = attention_backend("sdpa-math")(*qkv.float().unbind(2))
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=2e-2)
    got.sum().backward()
    assert qkv.grad.shape == qkv.shape
    assert fake.packed_calls == ([] if name == "sdpa" else [(2, 9, 3, 2, 16)])


def test_flash_backends_reject_what_they_cannot_run(monkeypatch):
    for name in ("fa2", "fa3"):
        monkeypatch.setitem(sys.modules, attn.OPTIONAL_PACKAGES[name][0], fake_flash_module(False))
    q, k, v, _ = make_inputs(2, 4, 4, 2, 72, masked=False)
    with pytest.raises(ValueError, match=r"'fa2' needs bf16/fp16 q/k/v, got torch.float32.*'sdpa'"):
        attention_backend("fa2")(q, k, v)
    with pytest.raises(ValueError, match=r"'fa3' supports head dims up to 256 that are multiples of 8, got 36"):
        attention_backend("fa3")(*(t[..., :36].bfloat16() for t in (q, k, v)))
    wide = torch.zeros(1, 2, 1, 264, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"'fa2' supports head dims up to 256, got 264; use 'fa2', 'sdpa'"):
        attention_backend("fa2")(wide, wide, wide)


def test_installed_backends_lists_sdpa_variants():
    assert {"sdpa", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math"} <= set(attn.installed_backends())


# ---- GPU: every installed backend against math in bf16 (flash-attention's rule: at most 2x math's own error) ----

@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES + [(2, 256, 256, 16, 72, False), (4, 256, 120, 16, 72, True)])
def test_gpu_backends_equal_math_in_bf16(case):
    q, k, v, mask = make_inputs(*case, dtype=torch.bfloat16, device="cuda")
    grad_out = torch.randn_like(q)
    math_fn = attention_backend("sdpa-math")
    exact = forward_backward(math_fn, *(t.double() for t in (q, k, v)), mask, grad_out.double())
    math_bf16 = forward_backward(math_fn, q, k, v, mask, grad_out)
    checked = []
    for name in attn.installed_backends():
        try:
            got = forward_backward(attention_backend(name), q, k, v, mask, grad_out)
        except (RuntimeError, ValueError) as error:  # a clear "cannot run this call" is allowed, a wrong answer not
            assert "model.attention_backend=" in str(error), f"{name}: {error}"
            continue
        checked.append(name)
        for what, a, m, e in zip(("out", "dq", "dk", "dv"), got, math_bf16, exact):
            limit = 2 * (m.double() - e).abs().max().item() + 1e-3
            err = (a.double() - e).abs().max().item()
            assert err <= limit, f"{name} {what}: error {err:.2e} > {limit:.2e}"
    assert "sdpa" in checked
