"""Activation checkpointing: every mode gives the same loss and gradients as none, saves fewer activations for
backward where it should, leaves parameter names alone, and rejects unknown modes."""
import pytest
import torch

from ristretto.engine.build import build_plain_model
from ristretto.engine.checkpointing import CHECKPOINTING_MODES, apply_activation_checkpointing
from ristretto.engine.config import build_config

TINY = ["model.hidden_size=32", "model.num_heads=2", "model.depth=2", "data.frames=3", "data.resolution=8"]


def make_model(mode: str, every: int = 2, kind: str = "tiny-t2v"):
    torch.manual_seed(0)
    model = build_plain_model(build_config(kind, TINY))
    # adaLN-Zero / zero-initialised output layers make many gradients exactly zero; perturb so all are exercised.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    wrapped = apply_activation_checkpointing(model, mode, every)
    return model, wrapped


def inputs(kind: str = "tiny-t2v"):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 3, 8, 8, generator=generator)
    t = torch.tensor([10, 500])
    if kind == "tiny-class":
        return x, t, {"label": torch.tensor([1, 2])}
    caption = torch.randn(2, 16, 32, generator=generator)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 5:] = False
    return x, t, {"caption": caption, "caption_mask": mask}


def loss_grads_and_saved(model, kind="tiny-t2v"):
    """(loss, {name: grad}, number of tensors autograd saved for backward outside checkpointed regions)."""
    x, t, conditions = inputs(kind)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(x, t, **conditions).pow(2).mean()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, len(saved)


@pytest.mark.parametrize("kind", ["tiny-t2v", "tiny-class"])
def test_every_mode_gives_the_same_gradients_and_saves_less(kind):
    reference_model, _ = make_model("none", kind=kind)
    ref_loss, ref_grads, ref_saved = loss_grads_and_saved(reference_model, kind)
    assert len(ref_grads) == len(list(reference_model.parameters()))
    saved_by_mode = {}
    for mode in CHECKPOINTING_MODES[1:]:
        model, wrapped = make_model(mode, kind=kind)
        assert wrapped > 0
        assert [n for n, _ in model.named_parameters()] == [n for n, _ in reference_model.named_parameters()]
        loss, grads, saved = loss_grads_and_saved(model, kind)
        assert torch.equal(loss, ref_loss), mode
        assert grads.keys() == ref_grads.keys(), mode
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-6, atol=1e-7, msg=f"{mode}: {name}")
        saved_by_mode[mode] = saved
    assert all(saved < ref_saved for saved in saved_by_mode.values()), (ref_saved, saved_by_mode)
    # full recomputes every block, every-k (k=2) half of them: full saves the least, every-k in between.
    assert saved_by_mode["full"] < saved_by_mode["every-k"] < ref_saved
    assert saved_by_mode["full"] < saved_by_mode["selective-mlp"]
    assert saved_by_mode["full"] < saved_by_mode["selective-attention"]


def test_checkpointing_is_skipped_without_grad():
    model, _ = make_model("full")
    x, t, conditions = inputs()
    with torch.no_grad():
        out = model(x, t, **conditions)
    reference, _ = make_model("none")
    with torch.no_grad():
        assert torch.equal(out, reference(x, t, **conditions))


def test_every_k_wraps_every_kth_block_and_unknown_mode_is_rejected():
    model, wrapped = make_model("every-k", every=3)
    assert wrapped == len(model.blocks[::3]) == 2  # 4 blocks (2 layers x spatial+temporal): blocks 0 and 3
    with pytest.raises(ValueError, match="train.checkpointing"):
        make_model("sometimes")


def test_auto_choices_per_block_give_the_same_gradients():
    """checkpointing=auto applies one choice per block (the planner's); any mix keeps loss and gradients."""
    reference_model, _ = make_model("none")
    ref_loss, ref_grads, ref_saved = loss_grads_and_saved(reference_model)
    torch.manual_seed(0)
    model = build_plain_model(build_config("tiny-t2v", TINY))
    model.load_state_dict(reference_model.state_dict())
    wrapped = apply_activation_checkpointing(model, "auto", choices=["attention", "mlp", "full", "none"])
    assert wrapped == 4  # attention + cross-attention of spatial block 0; an MLP; one whole block
    loss, grads, saved = loss_grads_and_saved(model)
    assert torch.equal(loss, ref_loss) and saved < ref_saved
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-6, atol=1e-7, msg=name)
    with pytest.raises(ValueError, match="auto"):
        apply_activation_checkpointing(model, "auto", choices=["none"])


def test_training_model_logs_the_auto_choice(caplog):
    """train.py builds through build_training_model: with checkpointing=auto it says what each block recomputes."""
    from ristretto.engine.build import build_training_model  # noqa: PLC0415
    from ristretto.engine.plan import GIB, predict_memory  # noqa: PLC0415

    overrides = [*TINY, "train.batch_size=2"]
    ends = [predict_memory(build_config("tiny-t2v", [*overrides, f"train.checkpointing={mode}"]), "cpu")
            for mode in ("none", "full")]
    budget = sum(plan.required_bytes for plan in ends) / 2 / GIB
    config = build_config("tiny-t2v", [*overrides, "train.checkpointing=auto", f"train.memory_budget_gb={budget}"])
    with caplog.at_level("INFO"):
        build_training_model(config, torch.device("cpu"))
    assert "checkpointing auto (budget" in caplog.text and "blocks recompute something" in caplog.text
