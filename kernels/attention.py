"""The attention seam: one `attention(q, k, v, mask)` function per backend, chosen once at build time.

Contract shared by every backend:
    q [N, Sq, heads, dim], k and v [N, Sk, heads, dim] (the "BSHD" layout flash-attention wants),
    mask None or bool [N, Sk] (True = attend; padding = False) -> out [N, Sq, heads, dim].
Spatial self-attention calls it through `packed_self_attention` with N = B*F, S = H*W (a backend may take the packed
qkv projection output whole: `attention_fn.packed`); temporal attention, when it goes through a backend, with
N = B*H*W, S = F (see model/layout.py); cross-attention with N = B and the F*H*W tokens of a sample's frames as Sq.
The softmax scale is always 1/sqrt(dim); there is no dropout and no causal mask.

A row of `mask` that is all False (a caption with no tokens) has no defined answer: sdpa returns NaN for it and the
varlen flash kernels return 0. The model never passes such rows (a caption keeps at least its end token).

Backends (`model.attention_backend`):
    sdpa            torch scaled_dot_product_attention; torch picks flash / cuDNN / efficient / math per call
    sdpa-flash, sdpa-cudnn, sdpa-efficient, sdpa-math
                    the same with one torch kernel forced (an error, not a fallback, when it cannot run the call)
    fa4             FlashAttention 4, `flash_attn.cute` (pip install flash-attn-4; Hopper/Blackwell)
    fa3             FlashAttention 3, `flash_attn_interface` (built from flash-attention's hopper/ folder)
    fa2             FlashAttention 2, `flash_attn` (pip install flash-attn)
    xformers        xformers.ops.memory_efficient_attention (pip install xformers)
The optional packages are imported only when their backend is asked for. Masked calls never wait for the device:
the flash backends pack the kept keys into a varlen batch on the device (cu_seqlens from the mask, max_seqlen_k the
padded length); xformers takes the mask as an additive bias.
"""
import importlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

AttentionFn = Callable[..., torch.Tensor]

# The torch kernel each forced sdpa variant pins.
SDPA_KERNELS = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-math": SDPBackend.MATH,
}

# Optional backends: (module to import, package that provides it, how to install it).
OPTIONAL_PACKAGES = {
    "fa4": ("flash_attn.cute", "flash-attn-4", "pip install flash-attn-4"),
    "fa3": ("flash_attn_interface", "flash-attn-3", "build it from flash-attention's hopper/ folder"),
    "fa2": ("flash_attn", "flash-attn", "pip install flash-attn"),
    "xformers": ("xformers.ops", "xformers", "pip install xformers"),
}

FLASH_MAX_HEAD_DIM = 256  # the largest head dim FlashAttention 2/3/4 compile kernels for
# FA2 pads odd head dims itself; FA3/FA4 need 16-byte rows (8 bf16 values).
FLASH_HEAD_DIM_MULTIPLE = {"fa2": 1, "fa3": 8, "fa4": 8}


def sdpa_attention(q, k, v, mask=None):
    """torch scaled_dot_product_attention; torch picks flash / cuDNN / efficient / math."""
    bias = None if mask is None else mask[:, None, None, :]  # (N, 1, 1, Sk) broadcast over heads and queries
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias)
    return out.transpose(1, 2)


def forced_sdpa(name: str) -> AttentionFn:
    """sdpa with the torch kernel `SDPA_KERNELS[name]` forced; a call that kernel cannot run raises, naming 'sdpa'."""
    kernel = SDPA_KERNELS[name]

    def attention(q, k, v, mask=None):
        try:
            with sdpa_kernel(kernel):
                return sdpa_attention(q, k, v, mask)
        except RuntimeError as error:
            if "No available kernel" not in str(error) and "No viable backend" not in str(error):
                raise
            raise RuntimeError(
                f"model.attention_backend={name!r}: torch's {kernel.name} kernel cannot run q {tuple(q.shape)} "
                f"{q.dtype} on {q.device.type} with mask={'None' if mask is None else 'bool'}; "
                f"use 'sdpa' (torch picks a kernel that can) or 'sdpa-math'") from None

    attention.__name__ = f"sdpa_{kernel.name.lower()}_attention"
    return attention


def packed_self_attention(attention_fn: AttentionFn, qkv: torch.Tensor) -> torch.Tensor:
    """Self-attention on the qkv projection's output [N, S, 3, heads, dim] -> [N, S, heads, dim].

    A backend with a packed entry (`attention_fn.packed`: FlashAttention's qkvpacked function) takes qkv whole and
    returns one dqkv in backward. Otherwise q, k, v are unbound as views (saved once, as one storage), and autograd
    stacks the backend's separate dq, dk, dv into dqkv in backward: torch's SDPA has no packed form, so that one
    transient copy stays for the sdpa backends."""
    packed = getattr(attention_fn, "packed", None)
    if packed is not None:
        return packed(qkv)
    return attention_fn(*qkv.unbind(2))


# ---- varlen packing for the flash backends ----

@dataclass
class Varlen:
    """A masked batch packed for varlen kernels: every query row kept, the attended keys of all sequences back to back
    at the front of k and v (the dropped keys follow them, zeroed; cu_seqlens_k never reaches them)."""
    q: torch.Tensor               # (N*Sq, heads, dim), a view of q
    k: torch.Tensor               # (N*Sk, heads, dim): kept keys in sequence order, then the dropped ones
    v: torch.Tensor               # (N*Sk, heads, dim)
    cu_seqlens_q: torch.Tensor    # (N+1,) int32: 0, Sq, 2*Sq, ...
    cu_seqlens_k: torch.Tensor    # (N+1,) int32: running sum of kept keys
    max_seqlen_q: int
    max_seqlen_k: int             # Sk: an upper bound, known from the shape without asking the device


def pack_varlen(q, k, v, mask) -> Varlen:
    """Pack (q, k, v, mask) for varlen kernels without a host sync: a stable sort moves the kept keys to the front
    (any mask pattern, not only trailing padding), so no count has to come back to the host to size a buffer."""
    n, sq, heads, dim = q.shape
    lengths = mask.sum(dim=1, dtype=torch.int32)                                     # (N,)
    cu_seqlens_k = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))        # (N+1,)
    cu_seqlens_q = torch.arange(0, (n + 1) * sq, sq, dtype=torch.int32, device=q.device)
    order = torch.argsort((~mask).flatten().to(torch.int8), stable=True)  # kept keys first, each in sequence order

    def pack(t):  # dropped keys are zeroed first, so their gradient is zero whatever the kernel leaves past the end
        return torch.where(mask[:, :, None, None], t, 0).flatten(0, 1)[order]

    return Varlen(q=q.reshape(n * sq, heads, dim), k=pack(k), v=pack(v), cu_seqlens_q=cu_seqlens_q,
                  cu_seqlens_k=cu_seqlens_k, max_seqlen_q=sq, max_seqlen_k=k.shape[1])


def additive_mask(mask, heads: int, queries: int, dtype) -> torch.Tensor:
    """bool [N, Sk] -> an additive bias [N, heads, Sq, Sk] (0 kept, -inf dropped) for xformers, broadcast as a view
    of a [N, 1, 1, Sk rounded up to 8] tensor (xformers wants 16-byte aligned rows)."""
    n, keys = mask.shape
    padded = torch.zeros(n, 1, 1, -(-keys // 8) * 8, dtype=dtype, device=mask.device)
    padded[..., :keys].masked_fill_(~mask[:, None, None, :], float("-inf"))
    return padded[..., :keys].expand(n, heads, queries, keys)


def first_output(result):
    """FlashAttention 3/4 return (out, lse) in some versions and out in others."""
    return result[0] if isinstance(result, tuple) else result


def check_flash_inputs(name: str, q) -> None:
    """FlashAttention kernels take fp16/bf16 and head dims up to 256 (FA3/FA4: multiples of 8); say so up front."""
    dim, multiple = q.shape[-1], FLASH_HEAD_DIM_MULTIPLE[name]
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"model.attention_backend={name!r} needs bf16/fp16 q/k/v, got {q.dtype}; "
                         f"run under bf16 autocast (train.precision='bf16') or use 'sdpa'")
    if dim > FLASH_MAX_HEAD_DIM or dim % multiple:
        raise ValueError(f"model.attention_backend={name!r} supports head dims up to {FLASH_MAX_HEAD_DIM}"
                         f"{f' that are multiples of {multiple}' if multiple > 1 else ''}, got {dim}; "
                         f"use 'fa2', 'sdpa' or 'xformers'")


# ---- optional backends: each loader imports its package and returns the attention function ----

def load_flash(name: str) -> AttentionFn:
    """fa2 / fa3 / fa4: same BSHD calls, differing only in module and return value."""
    module = import_backend(name)

    def attention(q, k, v, mask=None):
        check_flash_inputs(name, q)
        if mask is None:
            return first_output(module.flash_attn_func(q, k, v, softmax_scale=1.0 / math.sqrt(q.shape[-1])))
        packed = pack_varlen(q, k, v, mask)
        out = module.flash_attn_varlen_func(
            packed.q, packed.k, packed.v, cu_seqlens_q=packed.cu_seqlens_q, cu_seqlens_k=packed.cu_seqlens_k,
            max_seqlen_q=packed.max_seqlen_q, max_seqlen_k=packed.max_seqlen_k,
            softmax_scale=1.0 / math.sqrt(q.shape[-1]))
        return first_output(out).view_as(q)  # (N*Sq, heads, dim) -> (N, Sq, heads, dim)

    attention.__name__ = f"{name}_attention"
    if hasattr(module, "flash_attn_qkvpacked_func"):  # its backward writes dq, dk, dv into one dqkv buffer
        def packed(qkv):
            check_flash_inputs(name, qkv)
            return first_output(module.flash_attn_qkvpacked_func(qkv, softmax_scale=1.0 / math.sqrt(qkv.shape[-1])))

        attention.packed = packed
    return attention


def load_xformers(name: str = "xformers") -> AttentionFn:
    """xformers memory_efficient_attention takes BMHK (= BSHD); a mask becomes an additive bias tensor (no host sync,
    unlike a BlockDiagonalMask built from host lengths)."""
    xops = import_backend(name)

    def xformers_attention(q, k, v, mask=None):
        bias = None if mask is None else additive_mask(mask, q.shape[2], q.shape[1], q.dtype)
        return xops.memory_efficient_attention(q, k, v, attn_bias=bias)

    return xformers_attention


def import_backend(name: str):
    """Import the package behind backend `name`, or raise one line naming what to install."""
    module_name, package, install = OPTIONAL_PACKAGES[name]
    try:
        return importlib.import_module(module_name)
    except ImportError:
        raise ImportError(f"model.attention_backend={name!r} needs {package}: {install}") from None


# name -> loader returning the attention function (loaders import optional packages on demand)
ATTENTION_BACKENDS: dict[str, Callable[[], AttentionFn]] = {
    "sdpa": lambda: sdpa_attention,
    **{name: (lambda name=name: forced_sdpa(name)) for name in SDPA_KERNELS},
    "fa4": lambda: load_flash("fa4"),
    "fa3": lambda: load_flash("fa3"),
    "fa2": lambda: load_flash("fa2"),
    "xformers": load_xformers,
}


def attention_backend(name: str) -> AttentionFn:
    """The attention function called `name`; optional packages are imported here, once, at build time."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"model.attention_backend: unknown backend {name!r}; expected one of {list(ATTENTION_BACKENDS)}")
    return ATTENTION_BACKENDS[name]()


def installed_backends() -> list[str]:
    """Names whose packages import here (the sdpa variants always do; whether a kernel runs depends on the call)."""
    names = []
    for name in ATTENTION_BACKENDS:
        try:
            attention_backend(name)
        except ImportError:
            continue
        names.append(name)
    return names
