"""Memory-lean torch ops: the `kernels = "torch"` set, saving for backward what the Triton kernels save.

kernels/reference.py is the plain ground truth; run under autograd it keeps an fp32 copy of every LayerNorm input
and the normalised values of every LN-modulate. The autograd.Functions here compute the reference in forward without
recording a graph, keep only the op's inputs, and recompute the elementwise work in backward (one more pass over
memory, no matmul). Outputs come in the activation dtype (`activation_dtype`): under bf16 autocast an LN-modulate
emits bf16, which the next linear would cast to anyway (and keep), so nothing is saved twice. The gated residual
update keeps the residual's dtype (train.residual_dtype).
"""
import torch

from . import reference


def activation_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the next linear computes in: autocast's under autocast, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def recompute_grads(fn, saved, grad_outputs, needs):
    """Gradients of fn(*saved) (recomputed now, with a graph) w.r.t. the saved tensors that need them."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(need) for t, need in zip(saved, needs)]
        outputs = fn(*leaves)
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        grads = iter(torch.autograd.grad(outputs, wanted, grad_outputs) if wanted else ())
    return [next(grads) if leaf.requires_grad else None for leaf in leaves]


class LayerNormModulateFunction(torch.autograd.Function):
    """Saves x (and the [M, D] vectors); backward recomputes LN(x) * (1 + scale) + shift."""

    @staticmethod
    def forward(ctx, x, shift, scale, eps, out_dtype):
        ctx.save_for_backward(x, shift, scale)
        ctx.eps, ctx.out_dtype = eps, out_dtype
        return reference.layernorm_modulate(x, shift, scale, eps).to(out_dtype)

    @staticmethod
    def backward(ctx, dout):
        def op(x, shift, scale):
            return reference.layernorm_modulate(x, shift, scale, ctx.eps).to(ctx.out_dtype)

        return (*recompute_grads(op, ctx.saved_tensors, dout, ctx.needs_input_grad[:3]), None, None)


def layernorm_modulate(x, shift, scale, eps: float = 1e-6):
    """LN(x) * (1 + scale) + shift in the activation dtype, saving only x for backward."""
    return LayerNormModulateFunction.apply(x, shift, scale, eps, activation_dtype(x))


def gate_residual(residual, gate, y):
    """residual + gate * y in the residual's dtype. Autograd keeps y and the [N, 1, D] expanded gate: already lean."""
    return reference.gate_residual(residual, gate, y).to(residual.dtype)


def gate_residual_layernorm_modulate(residual, gate, y, shift, scale, eps: float = 1e-6):
    """(out, LN-modulate of out), out = residual + gate * y: keeps y, the gate and out (the next LN's input)."""
    out = gate_residual(residual, gate, y)
    return out, layernorm_modulate(out, shift, scale, eps)
