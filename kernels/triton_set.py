"""The Triton KernelSet: the signatures of `kernels/reference.py` without `upcast`, bound by `kernel_set("triton")`."""
from .gate_residual import gate_residual, gate_residual_layernorm_modulate
from .layernorm_modulate import layernorm_modulate
from .patch_embed import patch_embed
from .registry import KernelSet

TRITON_KERNELS = KernelSet(
    name="triton",
    patch_embed=patch_embed,
    layernorm_modulate=layernorm_modulate,
    gate_residual=gate_residual,
    gate_residual_layernorm_modulate=gate_residual_layernorm_modulate,
)
