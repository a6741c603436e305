"""The comparison rule every kernel is held to (flash-attention's): compute x (kernel), x_pt (reference in the same
low precision) and x_ref (reference upcast to fp64); pass when max|x - x_ref| <= 2 * max|x_pt - x_ref| + atol, for
every output and every gradient. Used by tests/kernels and usable on a GPU to check a build of the kernels."""
import torch


def outputs_and_grads(fn, inputs, douts, upcast=False, **kwargs):
    """Run fn on fresh leaves (fp64 when upcast, so the reference grads are not rounded) -> outputs + grads."""
    leaves = [t.detach().clone().double() if upcast else t.detach().clone() for t in inputs]
    for leaf, source in zip(leaves, inputs):
        leaf.requires_grad_(source.requires_grad)
    outs = fn(*leaves, **kwargs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grad_leaves = [leaf for leaf in leaves if leaf.requires_grad]
    douts = [d.double() if upcast else d for d in douts]
    return [o.detach() for o in outs] + list(torch.autograd.grad(outs, grad_leaves, douts))


def assert_matches_reference(kernel_fn, reference_fn, inputs, atol, douts=None):
    """x (kernel), x_pt (reference in the same precision), x_ref (reference in fp64):
    pass when max|x - x_ref| <= 2 max|x_pt - x_ref| + atol, for every output and every gradient."""
    if douts is None:
        outs = reference_fn(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        douts = [torch.randn_like(o) for o in outs]
    got = outputs_and_grads(kernel_fn, inputs, douts)
    same_precision = outputs_and_grads(reference_fn, inputs, douts)
    exact = outputs_and_grads(reference_fn, inputs, douts, upcast=True)
    for i, (x, x_pt, x_ref) in enumerate(zip(got, same_precision, exact)):
        assert (x.shape, x.dtype) == (x_pt.shape, x_pt.dtype), f"tensor {i}: shape or dtype differs"
        err = (x.double() - x_ref).abs().max().item()
        err_pt = (x_pt.double() - x_ref).abs().max().item()
        assert err <= 2 * err_pt + atol, f"tensor {i} (outputs, then grads): err {err:.3g}, reference's {err_pt:.3g}"
