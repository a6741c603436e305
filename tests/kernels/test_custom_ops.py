"""The Triton kernels' registered custom ops (kernels/custom_ops.py) pass torch.library.opcheck (schema, fake tensors,
autograd registration, AOT dispatch), emit the torch kernel set's dtypes, and compile inside a block with
fullgraph=True, i.e. without a graph break. Each op's values and gradients against the reference are tested in
tests/kernels/test_<op>.py."""
import pytest
import torch

from ristretto.kernels import custom_ops

pytest.importorskip("triton")


def make_inputs(n, s, d, gate_groups, norm_groups, device, seed=0):
    """(residual, gate, y, shift, scale) in fp32."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device).requires_grad_()

    return randn(n, s, d, scale=2), randn(gate_groups, d), randn(n, s, d), randn(norm_groups, d, scale=0.5), \
        randn(norm_groups, d, scale=0.5)


def op_cases(device):
    residual, gate, y, shift, scale = make_inputs(4, 5, 40, 2, 4, device)
    x = residual.detach()
    _, mean, rstd = custom_ops.layernorm_modulate_fwd(x, shift.detach(), scale.detach(), 1e-6, torch.float32)
    dout = torch.randn_like(x)
    return {
        "layernorm_modulate_fwd": (custom_ops.layernorm_modulate_fwd, (residual, shift, scale, 1e-6, torch.float32)),
        "layernorm_modulate_bwd": (custom_ops.layernorm_modulate_bwd,
                                   (dout, x, mean, rstd, scale.detach(), shift.shape[0])),
        "gate_residual_fwd": (custom_ops.gate_residual_fwd, (residual, gate, y)),
        "gate_residual_bwd": (custom_ops.gate_residual_bwd, (dout, gate.detach(), y.detach())),
    }


def patch_cases(device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 10, generator=gen).to(device).requires_grad_()
    weight = (torch.randn(24, 4, 2, 2, generator=gen) * 0.3).to(device).requires_grad_()
    bias = torch.randn(24, generator=gen).to(device).requires_grad_()
    pos = torch.randn(15, 24, generator=gen).to(device)
    dout = torch.randn(2, 15, 24, generator=gen).to(device)
    return {
        "patch_embed_fwd": (custom_ops.patch_embed_fwd, (x, weight, bias, pos, 2)),
        "patch_embed_fwd_no_pos": (custom_ops.patch_embed_fwd, (x, weight, bias, None, 2)),
        "patch_embed_bwd_input": (custom_ops.patch_embed_bwd_input, (dout, x.detach(), weight.detach(), 2)),
        "patch_embed_bwd_weight": (custom_ops.patch_embed_bwd_weight, (dout, x.detach(), weight.detach(), 2)),
    }


@pytest.mark.parametrize("name", list(op_cases("cpu")) + list(patch_cases("cpu")))
def test_custom_ops_pass_opcheck(name, device):
    op, args = {**op_cases(device), **patch_cases(device)}[name]
    torch.library.opcheck(op, args)


def tiny_model(kernels: str, device):
    from ristretto.engine.build import apply_kernels, build_plain_model  # noqa: PLC0415
    from ristretto.engine.config import build_config  # noqa: PLC0415

    config = build_config("tiny-t2v", ["model.hidden_size=32", "model.num_heads=2", "model.depth=1",
                                       "model.caption_channels=8", "model.caption_length=4"])
    torch.manual_seed(0)
    model = build_plain_model(config).to(device)
    apply_kernels(model, kernels)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2)
    return model  # blocks[0] is a spatial block: self-attention, cross-attention, MLP, the Triton row ops


def block_inputs(device):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, 16, 32, generator=generator).to(device).requires_grad_()
    cond = torch.randn(2, 6 * 32, generator=generator).to(device)
    context = torch.randn(6, 4, 32, generator=generator).to(device)
    mask = torch.tensor([[1, 1, 0, 0]] * 6, dtype=torch.bool, device=device)
    return x, cond, context, mask


def compiled_equals_eager(model, backend: str, device):
    """A block compiled as train.compile=true compiles it (engine/build.compile_blocks), with fullgraph=True so that a
    graph break raises, equals the eager block in output and input gradient."""
    from ristretto.engine.build import compile_blocks  # noqa: PLC0415

    x, cond, context, mask = block_inputs(device)
    temporal_x = torch.randn(8, 3, 32, generator=torch.Generator().manual_seed(2)).to(device).requires_grad_()
    calls = [(model.blocks[0], (x, cond, context, mask)),  # spatial: LN-modulate, gated residual, cross-attention
             (model.blocks[1], (temporal_x, cond))]  # temporal: LN-modulate, gated residual, MLP
    eager = [block(*args) for block, args in calls]
    eager_grads = [torch.autograd.grad(out.sum(), args[0])[0] for out, (_, args) in zip(eager, calls)]
    torch._dynamo.reset()
    compile_blocks(model, fullgraph=True, backend=backend)
    for (block, args), expected, expected_grad in zip(calls, eager, eager_grads):
        out = block(*args)
        (grad,) = torch.autograd.grad(out.sum(), args[0])
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)  # inductor reorders fp32 sums
        torch.testing.assert_close(grad, expected_grad, atol=1e-4, rtol=1e-4)


def test_a_torch_kernels_block_compiles_without_graph_breaks():
    compiled_equals_eager(tiny_model("torch", "cpu"), "inductor", torch.device("cpu"))


def test_a_triton_kernels_block_traces_without_graph_breaks(device):
    """The custom ops are single opaque nodes: dynamo + AOTAutograd trace the whole block (run eagerly here, so the
    interpreter can execute the kernels; inductor on the GPU test below)."""
    compiled_equals_eager(tiny_model("triton", device), "aot_eager", device)


@pytest.mark.gpu
def test_a_triton_kernels_block_compiles_with_inductor_on_cuda():
    compiled_equals_eager(tiny_model("triton", "cuda"), "inductor", torch.device("cuda"))


def test_output_dtypes_follow_the_kernel_sets_rule(device):
    """Under autocast an LN-modulate emits the autocast dtype (the next linear's input) and the gated residual keeps
    the residual's dtype, as the torch kernel set does (kernels/lean.py): same memory, either set."""
    from ristretto.kernels import lean  # noqa: PLC0415

    residual, gate, y, shift, scale = make_inputs(4, 5, 40, 2, 4, device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        ours = [custom_ops.layernorm_modulate(residual, shift, scale), custom_ops.gate_residual(residual, gate, y)]
        torch_set = [lean.layernorm_modulate(residual, shift, scale), lean.gate_residual(residual, gate, y)]
    assert [t.dtype for t in ours] == [t.dtype for t in torch_set] == [torch.bfloat16, torch.float32]


def test_temporal_attention_op_passes_opcheck(device):
    qkv = torch.randn(2 * 5, 3, 3, 2, 8, generator=torch.Generator().manual_seed(4)).to(device)  # B=2, F=5, S=3
    torch.library.opcheck(custom_ops.temporal_attention_fwd, (qkv.clone().requires_grad_(), 5))
    out, lse = custom_ops.temporal_attention_fwd(qkv, 5)
    torch.library.opcheck(custom_ops.temporal_attention_bwd, (qkv, out, torch.randn_like(out), lse, 5))


def test_model_with_triton_temporal_attention_traces_without_graph_breaks(device):
    from ristretto.engine.build import build_plain_model, compile_blocks  # noqa: PLC0415
    from ristretto.engine.config import build_config  # noqa: PLC0415

    config = build_config("tiny-t2v", ["model.hidden_size=32", "model.num_heads=2", "model.depth=1",
                                       "model.caption_channels=8", "model.caption_length=4",
                                       "model.temporal_attention=triton", "model.kernels=triton"])
    torch.manual_seed(0)
    model = build_plain_model(config).to(device)
    args = (torch.randn(2, 4, 3, 16, 16).to(device), torch.tensor([3, 500], device=device))
    conditions = dict(caption=torch.randn(2, 4, 8).to(device), caption_mask=torch.ones(2, 4, dtype=torch.bool,
                                                                                      device=device))
    eager = model(*args, **conditions)
    torch._dynamo.reset()
    compile_blocks(model, fullgraph=True, backend="aot_eager")  # a graph break in any block raises
    torch.testing.assert_close(model(*args, **conditions), eager, atol=1e-5, rtol=1e-5)
