"""fp8-te in training, on CPU with the Transformer Engine stand-in (tests/engine/fake_te.py): activation checkpointing
in every mode gives the gradients of no checkpointing (and torch's own checkpoint fails, as with TE); FP8 scaling
state goes into checkpoints as safetensors tensors and a killed-and-resumed run logs the losses of an uninterrupted
one; is_first_microbatch casts weights once per optimizer step; one amax per step across DDP ranks."""
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch.utils.checkpoint import CheckpointError

from ristretto.engine import precision as prec
from ristretto.engine import train as train_module
from ristretto.engine.build import build_plain_model
from ristretto.engine.checkpoint import latest_checkpoint, load_training_state, verify_checkpoint
from ristretto.engine.checkpointing import AUTO, BLOCK_CHOICES, CHECKPOINTING_MODES, apply_activation_checkpointing
from ristretto.engine.config import build_config
from ristretto.engine.diffusion import Diffusion

from . import fake_te

TINY = ["model.hidden_size=32", "model.num_heads=2", "model.depth=2", "data.frames=2", "data.resolution=8",
        "train.batch_size=2", "train.log_every=1", "train.warmup_steps=1", "diffusion.sample_steps=1",
        "sample.num_samples=1", "train.device=cpu", "train.precision=fp8-te"]


@pytest.fixture
def te(monkeypatch):
    """The stand-in installed, FP8 allowed on CPU, and every shape-legal block linear converted (tiny models are far
    below the rule's pays-off threshold, which is tested in test_precision.py)."""
    monkeypatch.setattr(prec, "check_fp8_device", lambda device, precision, recipe: None)
    monkeypatch.setattr(train_module, "check_environment", lambda config, device: None)  # its CPU check, likewise
    monkeypatch.setattr(prec, "FP8_MIN_INTENSITY", 0)
    return fake_te.install(monkeypatch)


def te_linears(model):
    return [m for m in model.modules() if isinstance(m, fake_te.Linear)]


# ---- activation checkpointing ----

def model_batch(config, device="cpu"):
    torch.manual_seed(0)
    model = build_plain_model(config).to(device)
    with torch.no_grad():  # off adaLN-Zero's zero gates, so every block linear has a gradient
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    gen = torch.Generator().manual_seed(1)
    frames, size = config.data.frames, config.data.resolution
    x = torch.randn(2, frames, config.model.in_channels, size, size, generator=gen)
    t = torch.tensor([10, 700])
    context = torch.randn(2, config.model.caption_length, config.model.caption_channels, generator=gen)
    return model, {key: value.to(device) for key, value in dict(x=x, timestep=t, caption=context).items()}


def fp8_gradients(mode: str, recipe: str, use_te_checkpoint: bool = True, device="cpu",
                  overrides=()) -> dict[str, torch.Tensor]:
    """Gradients of the second of two forward/backward passes (the first moves delayed scaling off scale 1)."""
    config = build_config("tiny-t2v", TINY + [f"train.fp8_recipe={recipe}", *overrides])
    model, batch = model_batch(config, device)
    precision = prec.apply_precision(model, "fp8-te", recipe)
    assert len(precision.converted) > 0
    choices = [BLOCK_CHOICES[i % len(BLOCK_CHOICES)] for i in range(len(model.blocks))] if mode == AUTO else None
    apply_activation_checkpointing(model, mode, 2, choices,
                                   checkpoint_fn=precision.checkpoint_function() if use_te_checkpoint else None)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        with precision.autocast():
            out = model(**batch)
        out.float().square().mean().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("recipe", ["delayed", "current"])
@pytest.mark.parametrize("mode", [m for m in (*CHECKPOINTING_MODES, AUTO) if m != "none"])
def test_fp8_te_checkpointing_gives_the_gradients_of_no_checkpointing(te, mode, recipe):
    expected = fp8_gradients("none", recipe)
    calls_before = te.distributed.calls
    actual = fp8_gradients(mode, recipe)
    assert te.distributed.calls > calls_before  # recompute went through TE's checkpoint
    assert actual.keys() == expected.keys() and all(expected[n].abs().sum() > 0 for n in expected if "attn.qkv" in n)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)


def test_torch_checkpoint_recomputes_outside_the_fp8_context_and_fails(te):
    """Why the precision supplies the checkpoint: torch's recompute runs TE linears without FP8, which save other
    tensors, so torch refuses (TE behaves the same; the stand-in must too, or the test above proves nothing)."""
    with pytest.raises(CheckpointError):
        fp8_gradients("full", "delayed", use_te_checkpoint=False)


def test_stand_in_fp8_differs_from_bf16(te):
    """The stand-in really quantises: FP8 gradients are not the bf16 ones (else the equalities above are empty)."""
    config = build_config("tiny-t2v", TINY)
    model, batch = model_batch(config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(**batch).float().square().mean().backward()
    bf16 = {n: p.grad for n, p in model.named_parameters()}
    fp8 = fp8_gradients("none", "current")
    name = "blocks.0.attn.qkv.weight"
    assert fp8[name].abs().sum() > 0 and not torch.equal(fp8[name], bf16[name])


def test_sampling_under_no_grad_skips_recompute(te):
    config = build_config("tiny-t2v", TINY)
    model, batch = model_batch(config)
    precision = prec.apply_precision(model, "fp8-te", "delayed")
    apply_activation_checkpointing(model, "full", 2, checkpoint_fn=precision.checkpoint_function())
    with torch.no_grad(), precision.autocast():
        model(**batch)
    assert te.distributed.calls == 0


# ---- is_first_microbatch ----

def test_microbatch_context_sets_and_resets_the_flag():
    precision = prec.Precision("fp8-te", "cpu")
    seen = []
    for micro in range(3):
        with precision.microbatch(micro):
            seen.append(precision.first_microbatch)
    assert seen == [True, False, False] and precision.first_microbatch is None


# ---- training runs: accumulation, checkpoints, resume ----

def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_weights_cast_once_per_optimizer_step_with_accumulation(te, tmp_path, monkeypatch):
    built = {}
    real_build = train_module.build_training_model

    def build_and_keep(config, device, **kwargs):
        built["model"], ema, precision = real_build(config, device, **kwargs)
        return built["model"], ema, precision

    monkeypatch.setattr(train_module, "build_training_model", build_and_keep)
    train_module.train(build_config("tiny-t2v", TINY + ["train.grad_accum=3", "train.max_steps=2"]), tmp_path / "run")
    linears = te_linears(built["model"])
    assert linears and [m.weight_casts for m in linears] == [2] * len(linears)  # 2 steps x 3 micro-batches


def run_config(extra=()):
    return build_config("tiny-t2v", TINY + ["train.grad_accum=2", "train.checkpointing=full", "train.max_steps=6",
                                            "train.ckpt_every=2", "train.ema_decay=0.9", *extra])


@pytest.fixture
def uninterrupted(te, tmp_path):
    run_dir = tmp_path / "uninterrupted"
    train_module.train(run_config(), run_dir)
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}, run_dir


def interrupted_then_resumed(tmp_path, monkeypatch, stop_after_step: int = 3) -> dict[int, float]:
    """A run stopped by SIGINT inside step `stop_after_step` (it checkpoints and returns), then resumed to the end."""
    real = train_module.micro_step_loss
    batch = 2 * 2  # samples per optimizer step

    def interrupt(model, diffusion, precision, latents, conditions, first_index, config):
        if first_index == (stop_after_step - 1) * batch:
            os.kill(os.getpid(), __import__("signal").SIGINT)
        return real(model, diffusion, precision, latents, conditions, first_index, config)

    run_dir = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "micro_step_loss", interrupt)
        state = train_module.train(run_config(), run_dir)
    assert state.stopped_by == "SIGINT" and state.step == stop_after_step
    fake_te.reset()  # a new process: no FP8 state survives but what the checkpoint holds
    train_module.train(run_config(), run_dir, resume=latest_checkpoint(run_dir))
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def test_fp8_state_is_saved_as_tensors(uninterrupted):
    _, run_dir = uninterrupted
    checkpoint = latest_checkpoint(run_dir)
    files = verify_checkpoint(checkpoint)["files"]
    assert "fp8_state.safetensors" in files  # covered by the manifest's checksums
    state = load_file(str(checkpoint / "fp8_state.safetensors"))
    assert "blocks.0.attn.qkv.scaling_fwd.scale" in state and "blocks.0.attn.qkv.scaling_bwd.amax_history" in state
    assert all(torch.isfinite(v).all() for v in state.values())
    assert (state["blocks.0.attn.qkv.scaling_fwd.scale"] != 1).any()  # calibrated, not the initial scale
    weights = load_file(str(checkpoint / "model.safetensors"))
    assert not any("_extra_state" in key for key in weights)  # TE's pickle is never written
    load_training_state(checkpoint)  # weights_only=True


def test_killed_and_resumed_fp8_run_logs_the_uninterrupted_losses(uninterrupted, tmp_path, monkeypatch):
    expected, _ = uninterrupted
    assert interrupted_then_resumed(tmp_path, monkeypatch) == expected


def test_resume_without_fp8_state_would_differ(uninterrupted, tmp_path, monkeypatch):
    """The equality above needs the restored scales: dropping them (what the engine did before) changes the losses."""
    expected, _ = uninterrupted
    monkeypatch.setattr(train_module, "restore_fp8_state", lambda state, model, precision: None)
    resumed = interrupted_then_resumed(tmp_path, monkeypatch)
    assert [resumed[s] for s in (1, 2, 3)] == [expected[s] for s in (1, 2, 3)]
    assert resumed[4] != expected[4]


# ---- amax reduction across data-parallel ranks ----

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def amax_worker(rank: int, port: int, out: str) -> None:
    from ristretto.engine import distributed as D

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    fake_te.install()
    prec.check_fp8_device = lambda device, precision, recipe: None
    prec.FP8_MIN_INTENSITY = 0
    info = D.DistInfo(rank, 2, 0, torch.device("cpu"), "ddp")
    scales = {}
    for grouped in (True, False):
        config = build_config("tiny-t2v", TINY)
        model, batch = model_batch(config)
        precision = prec.apply_precision(model, "fp8-te", "delayed")
        precision.fp8_group = D.amax_reduction_group(info) if grouped else None
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        batch["x"] = batch["x"] * (1 + 3 * rank)  # different data (and amaxes) on each rank
        with precision.autocast():
            prediction = ddp(**batch)
        prediction.float().square().mean().backward()
        scales[str(grouped)] = prec.fp8_scaling_state(model)
    torch.save(scales, Path(out) / f"rank{rank}.pt")
    # Both ranks done with every collective and the DDP reducers gone before the groups are torn down: a rank that
    # destroyed its groups while the other still ran was seen to abort (SIGABRT, "terminate called without an
    # active exception") once in a loaded CI run.
    del ddp, model, precision
    dist.barrier()
    dist.destroy_process_group()


def test_amax_is_reduced_over_the_data_parallel_ranks(tmp_path):
    mp.spawn(amax_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    key = "blocks.0.attn.qkv.scaling_fwd.scale"
    assert not torch.equal(ranks[0]["False"][key], ranks[1]["False"][key])  # each rank alone: different scales
    # (the backward's amaxes of this step are reduced at the next step's autocast exit, as in TE)
    for name in [n for n in ranks[0]["True"] if not n.endswith("scaling_bwd.amax_history")]:
        torch.testing.assert_close(ranks[0]["True"][name], ranks[1]["True"][name], rtol=0, atol=0, msg=name)
    # the shared scale is the larger amax's: the smaller of the two ranks' own scales
    assert torch.equal(ranks[0]["True"][key], torch.minimum(ranks[0]["False"][key], ranks[1]["False"][key]))


# ---- the same with Transformer Engine itself ----

GPU_MODEL = ["model.hidden_size=128", "model.num_heads=2", "data.resolution=16"]  # 16 tokens/frame, dims % 16 == 0


@pytest.fixture
def real_te(monkeypatch):
    pytest.importorskip("transformer_engine.pytorch")
    if torch.cuda.get_device_capability() < prec.FP8_MIN_CAPABILITY:
        pytest.skip("FP8 needs sm_89+")
    monkeypatch.setattr(prec, "FP8_MIN_INTENSITY", 0)


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["delayed", "current"])
@pytest.mark.parametrize("mode", [m for m in (*CHECKPOINTING_MODES, AUTO) if m != "none"])
def test_gpu_te_checkpointing_gives_the_gradients_of_no_checkpointing(real_te, mode, recipe):
    expected = fp8_gradients("none", recipe, device="cuda", overrides=GPU_MODEL)
    actual = fp8_gradients(mode, recipe, device="cuda", overrides=GPU_MODEL)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)


@pytest.mark.gpu
def test_gpu_te_scaling_state_round_trip(real_te):
    config = build_config("tiny-t2v", TINY + GPU_MODEL)
    outputs, states = [], []
    for restore in (False, True):
        model, batch = model_batch(config, "cuda")
        precision = prec.apply_precision(model, "fp8-te", "delayed")
        if restore:
            prec.load_fp8_scaling_state(model, states[0], precision.te_recipe)
        else:
            for _ in range(2):
                with precision.autocast():
                    model(**batch).float().square().mean().backward()
            states.append(prec.fp8_scaling_state(model))
        with torch.no_grad(), precision.autocast():
            outputs.append(model(**batch))
    assert states[0] and all(not torch.equal(v, torch.ones_like(v)) for k, v in states[0].items() if "fwd.scale" in k)
    # the same weights (the first model's updates were not applied: no optimizer) and the same scales
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
