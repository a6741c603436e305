"""A whole Latte model with kernels=triton equals kernels=torch, forward and every parameter gradient."""
import pytest
import torch

from ristretto.engine.build import apply_kernels, build_plain_model
from ristretto.engine.config import build_config

pytest.importorskip("triton")

TINY = ["model.hidden_size=40", "model.num_heads=2", "model.depth=1", "data.frames=3", "data.resolution=16",
        "model.caption_channels=12", "model.caption_length=5"]


@pytest.mark.parametrize("preset, patch", [("tiny-t2v", 2), ("tiny-class", 4)])
def test_triton_model_equals_torch_model(preset, patch, device):
    config = build_config(preset, TINY + [f"model.patch_size={patch}"])
    torch.manual_seed(0)
    reference = build_plain_model(config).to(device)
    with torch.no_grad():  # zero-initialised layers would make most gradients trivially equal: randomise all
        for param in reference.parameters():
            param.normal_(0, 0.2)
    fused = build_plain_model(config).to(device)
    fused.load_state_dict(reference.state_dict())
    apply_kernels(fused, "triton")
    assert fused.blocks[0].attn.kernels.name == "triton" and reference.blocks[0].attn.kernels.name == "torch"

    generator = torch.Generator().manual_seed(1)
    video = torch.randn(2, 3, 3, 16, 16, generator=generator).to(device)
    timestep = torch.tensor([3, 700], device=device)
    if config.model.kind == "class":
        conditions = {"label": torch.tensor([1, 6], device=device)}
    else:
        conditions = {"caption": torch.randn(2, 5, 12, generator=generator).to(device),
                      "caption_mask": torch.tensor([[1, 1, 1, 0, 0], [1] * 5], dtype=torch.bool, device=device)}
    outputs = [model(video, timestep, **conditions) for model in (reference, fused)]
    torch.testing.assert_close(outputs[1], outputs[0], atol=2e-5, rtol=1e-4)
    upstream = torch.randn(outputs[0].shape, generator=generator).to(device)
    for out in outputs:
        (out * upstream).sum().backward()
    for (name, ref_param), fused_param in zip(reference.named_parameters(), fused.parameters()):
        # fp32 summation order differs between the kernels and torch: compare relative to the gradient's scale
        scale = ref_param.grad.abs().max().item()
        assert (fused_param.grad - ref_param.grad).abs().max().item() <= 5e-5 * scale + 1e-6, name
