"""The Triton KernelSet: the signatures of `kernels/reference.py` without `upcast`, bound by `kernel_set("triton")`.
All three are the registered custom ops of kernels/custom_ops.py (opaque to torch.compile: no graph breaks)."""
from .custom_ops import gate_residual, layernorm_modulate, patch_embed
from .registry import KernelSet

TRITON_KERNELS = KernelSet(
    name="triton",
    patch_embed=patch_embed,
    layernorm_modulate=layernorm_modulate,
    gate_residual=gate_residual,
)
