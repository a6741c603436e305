"""The kernels seam: the functional ops the model calls, bound once at build time to Triton or to the torch reference.

Model modules that use fused ops carry a `kernels: KernelSet` attribute (the torch reference by default);
`engine.build.apply_kernels` swaps it on every module from outside, so model code never branches on a backend.
"""
from dataclasses import dataclass
from typing import Callable

from . import lean, reference


@dataclass(frozen=True)
class KernelSet:
    name: str
    patch_embed: Callable
    layernorm_modulate: Callable
    gate_residual: Callable


TORCH_KERNELS = KernelSet(
    name="torch",
    patch_embed=reference.patch_embed,
    layernorm_modulate=lean.layernorm_modulate,  # the reference's values, saving what the Triton kernels save
    gate_residual=lean.gate_residual,
)

KERNEL_SET_NAMES = ("torch", "triton")


def kernel_set(name: str) -> KernelSet:
    """The KernelSet called `name` ("torch" or "triton"); Triton is imported only when asked for."""
    if name == "torch":
        return TORCH_KERNELS
    if name == "triton":
        from .triton_set import TRITON_KERNELS  # noqa: PLC0415 - optional dependency, imported on demand

        return TRITON_KERNELS
    raise ValueError(f"kernels: unknown kernel set {name!r}; expected one of {KERNEL_SET_NAMES}")
