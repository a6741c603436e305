"""The training step issues work and does not wait: randomness is drawn on the training device, the step reads the
device once (loss and gradient norm together, for the NaN guard and the log), and the training loop runs exactly
the step function that bench/step.py times. On CUDA, steps after warm-up run under
torch.cuda.set_sync_debug_mode("error"), so any other synchronising call fails the test."""
import json

import pytest
import torch

from ristretto.bench import step as step_bench
from ristretto.engine import train as train_module
from ristretto.engine.config import build_config

HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu")
TINY = ["model.hidden_size=32", "model.num_heads=2", "model.depth=1", "data.frames=2", "data.resolution=8",
        "train.batch_size=2", "train.log_every=1", "diffusion.sample_steps=1", "sample.num_samples=1"]


def smoke_rig(device, *extra):
    args = step_bench.parse_args([])
    config = step_bench.bench_config(step_bench.SMOKE_CONFIG, args, "fp32", "none")
    for assignment in extra:
        from ristretto.engine.config import apply_override  # noqa: PLC0415

        apply_override(config, assignment)
    return step_bench.StepRig.build(config, device)


class HostReadCounter:
    """Counts tensor -> host reads (the calls that make the host wait for a CUDA device) while `counting` is on."""

    def __init__(self, monkeypatch):
        self.reads, self.counting = [], True
        for name in HOST_READS:
            real = getattr(torch.Tensor, name)

            def counted(tensor, *args, _real=real, _name=name, **kwargs):
                if self.counting:
                    self.reads.append(_name)
                return _real(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)

    def paused(self, fn):
        def call(*args, **kwargs):
            self.counting = False
            try:
                return fn(*args, **kwargs)
            finally:
                self.counting = True
        return call


@pytest.mark.parametrize("extra", [(), ("train.grad_accum=3", "diffusion.high_noise_bias=0.5",
                                        "diffusion.loss_weighting=min_snr")])
def test_one_host_read_per_optimizer_step(monkeypatch, extra):
    rig = smoke_rig(torch.device("cpu"), *extra)
    rig.step()  # warm-up
    counter = HostReadCounter(monkeypatch)
    # CPU AdamW keeps its step counts on the host and reads them; CUDA's fused AdamW keeps them on the device.
    rig.optimizer.step = counter.paused(rig.optimizer.step)
    for _ in range(3):
        result = rig.step()
        assert result.stepped
    assert counter.reads == ["tolist"] * 3  # read_step_values: (loss, grad norm) in one transfer per step


def test_the_micro_steps_return_device_tensors_and_leave_reading_to_the_update(monkeypatch):
    rig = smoke_rig(torch.device("cpu"), "train.grad_accum=2")
    counter = HostReadCounter(monkeypatch)
    loss = train_module.accumulate_gradients(rig.model, rig.batches, rig.encoders, rig.diffusion, rig.precision,
                                             rig.state, rig.config, rig.device, rig.info)
    assert counter.reads == []
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.device == rig.device
    timesteps, noise = train_module.draw_timesteps_and_noise((3, 2, 4, 4), 0, 0, 1000, 0.5, device=rig.device)
    drop = train_module.caption_dropout_mask(3, 0, 0, 0.5, device=rig.device)
    assert counter.reads == [] and {timesteps.device, noise.device, drop.device} == {rig.device}


def test_the_training_loop_runs_the_benchmarked_step(tmp_path, monkeypatch):
    results = []
    real = train_module.train_step

    def recording(*args, **kwargs):
        results.append(real(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(train_module, "train_step", recording)
    train_module.train(build_config("tiny-t2v", TINY + ["train.max_steps=2"]), tmp_path / "run")
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["loss"], r["grad_norm"]) for r in logged] == [(r.loss, r.grad_norm) for r in results]


@pytest.mark.gpu
@pytest.mark.parametrize("extra", [("train.precision=bf16",), ("train.precision=bf16", "train.compile=true"),
                                   ("train.precision=bf16", "model.kernels=triton", "train.grad_accum=2")])
def test_cuda_steps_after_warm_up_never_synchronise(extra):
    rig = smoke_rig(torch.device("cuda"), *extra)
    for _ in range(3):
        rig.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            assert rig.step().stepped
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert rig.optimizer.defaults["fused"]


@pytest.mark.gpu
def test_the_step_benchmark_counts_the_one_deliberate_sync():
    rig = smoke_rig(torch.device("cuda"), "train.precision=bf16")
    for _ in range(3):
        rig.step()
    assert step_bench.host_syncs_per_step(rig) == 1.0
