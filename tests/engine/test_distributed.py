"""Data parallelism: DDP and FSDP2 over 2 CPU ranks (gloo) give the 1-process run's parameters, skip gradient sync
before the last micro-batch, and write checkpoints a 1-process run resumes from.

One spawned pair of processes runs both strategies (3 optimizer steps of a tiny Latte, grad_accum=2, EMA on,
gradient clipping on, crossing an epoch boundary) with a loop built from the engine's own functions; the parent
runs the 1-process reference with the same global batch and compares."""
import os
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor
from safetensors.torch import load_file, save_file

from ristretto.engine import distributed as D
from ristretto.engine.build import build_plain_model, build_training_model
from ristretto.engine.config import build_config
from ristretto.engine.datasets import build_dataset, build_loader
from ristretto.engine.diffusion import Diffusion
from ristretto.engine.sampler import ResumableSampler
from ristretto.engine.train import (TrainState, build_encoders, build_optimizer, caption_dropout_mask,
                                    drop_conditions, encode_batch, micro_step_loss, update_step)

WORLD, PER_RANK_BATCH, ACCUM, STEPS, SAVE_AT = 2, 2, 2, 3, 2
TINY = ["model.hidden_size=32", "model.num_heads=2", "model.depth=1", "data.frames=4", "data.resolution=16",
        "model.patch_size=4", f"train.grad_accum={ACCUM}", "train.warmup_steps=2", "train.lr=3e-3",
        "train.ema_decay=0.9", "train.cfg_dropout=0.3", "train.grad_clip=0.1", "train.device=cpu",
        "data.synthetic_size=12"]  # 12 samples = 1.5 global batches of 8: step 2 crosses the epoch boundary
ATOL = 1e-6  # fp32; differences are only the summation order of the gradient mean


def tiny_config(batch_size: int):
    return build_config("tiny-t2v", TINY + [f"train.batch_size={batch_size}"])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Run:
    """A tiny training run built the way train.py builds one, plus the distributed seams."""

    def __init__(self, config, info: D.DistInfo):
        self.config, self.info = config, info
        train = config.train
        torch.manual_seed(train.seed)  # the same initial weights on every rank
        self.model, self.ema, self.precision = build_training_model(config, info.device)
        self.train_model = D.apply_data_parallel(self.model, info, mixed_precision=train.precision != "fp32")
        D.apply_data_parallel_to_ema(self.ema.model, info)
        self.optimizer, self.scheduler = build_optimizer(self.model, train)
        dataset = build_dataset(config)
        self.sampler = ResumableSampler(len(dataset), train.seed, rank=info.rank, world_size=info.world_size,
                                        block=train.batch_size)
        self.loader = build_loader(dataset, train.batch_size, self.sampler)
        self.encoders = build_encoders(config, dataset, info.device)
        self.diffusion = Diffusion(config.diffusion)
        self.state = TrainState()

    def step(self, after_backward=None) -> tuple[float, float]:
        """One optimizer step, as train.py's accumulate_gradients + update_step with the distributed seams."""
        config, train, info = self.config, self.config.train, self.info
        batches = self.batches = getattr(self, "batches", None) or iter(self.loader)
        loss_sum = 0.0
        for micro in range(train.grad_accum):
            latents, conditions = encode_batch(next(batches), self.encoders, config, info.device)
            first = D.first_sample_index(self.state.samples_seen, micro, info, train.batch_size)
            drop = caption_dropout_mask(latents.shape[0], first, train.seed, train.cfg_dropout)
            conditions = drop_conditions(conditions, drop, self.encoders, config)
            with D.sync_context(self.train_model, micro == train.grad_accum - 1):
                loss = micro_step_loss(self.train_model, self.diffusion, self.precision, latents, conditions, first,
                                       config)
                (loss / train.grad_accum).backward()
            if after_backward is not None:
                after_backward(micro)
            loss_sum += float(loss.detach())
        loss = D.all_reduce_mean(loss_sum / train.grad_accum, info)
        result = update_step(self.model, self.optimizer, self.scheduler, self.ema, self.state, train, loss)
        grad_norm = result.grad_norm
        assert result.stepped
        self.state.samples_seen += D.global_batch_size(train.batch_size, train.grad_accum, info)
        self.state.step += 1
        return loss, grad_norm

    def extra(self) -> dict:
        return {"step": self.state.step, "samples_seen": self.state.samples_seen,
                "scheduler": self.scheduler.state_dict(),
                "data": D.global_data_state(self.loader.state_dict(), self.info)}

    def resume(self, path: Path) -> None:
        extra = D.load_distributed(path, self.model, self.optimizer, self.ema.model, self.info)
        self.scheduler.load_state_dict(extra["scheduler"])
        self.loader.load_state_dict(D.local_data_state(extra["data"], self.info))
        self.state = TrainState(step=extra["step"], samples_seen=extra["samples_seen"])


def optimizer_state(run: Run) -> dict:
    """Full FQN-keyed optimizer state as plain tensors (rank 0), comparable across strategies and world sizes."""
    state = D.get_optimizer_state_dict(run.model, run.optimizer, options=D.full_state_options())
    return {f"{fqn}/{key}": torch.as_tensor(value).float().clone() for fqn, values in state.get("state", {}).items()
            for key, value in values.items()}


# ------------------------------------------------------------------------------------------------ the 2-rank side

def count_calls(module, name: str, counter: list):
    original = getattr(module, name)

    def counted(*args, **kwargs):
        counter.append(name)
        return original(*args, **kwargs)

    setattr(module, name, counted)


def equal_across_ranks(tensors) -> bool:
    flat = torch.cat([t.detach().flatten() for t in tensors])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


def worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    out = Path(out)
    info = D.init_distributed("auto", device="cpu")
    assert info.strategy == "ddp" and info.world_size == WORLD and info.rank == rank
    config = tiny_config(PER_RANK_BATCH)
    reduce_scatters = []
    count_calls(dist, "reduce_scatter_single", reduce_scatters)  # what FSDP2 reduces gradients with
    try:
        for strategy in ("ddp", "fsdp"):
            run = Run(config, replace(info, strategy=strategy))
            log = {"sync": []}
            if strategy == "ddp":
                allreduces = []
                run.train_model.register_comm_hook(None, counting_allreduce_hook(allreduces))

                def check(micro, allreduces=allreduces, log=log):
                    log["sync"].append((len(allreduces), equal_across_ranks(p.grad for p in run.model.parameters())))
                    allreduces.clear()
            else:
                def check(micro, log=log):
                    # Without sync FSDP2 keeps the unsharded gradient to itself: no sharded .grad exists yet.
                    has_grads = any(p.grad is not None for p in run.model.parameters())
                    log["sync"].append((len(reduce_scatters), has_grads))
                    reduce_scatters.clear()
            log["losses"] = [run.step(check)]
            for _ in range(1, STEPS):
                if run.state.step == SAVE_AT:
                    D.save_distributed(out / f"{strategy}_ckpt", run.model, run.optimizer, run.extra(),
                                       run.ema.model, run.info)
                log["losses"].append(run.step())
            weights = D.gather_full_state(run.model)
            ema = D.gather_full_state(run.ema.model)
            D.export_weights(out / f"{strategy}_export", run.model, run.ema.model, run.info)
            sampling = D.plain_module_on_main(run.ema.model, lambda: build_plain_model(config), run.info)
            assert (sampling is None) == (rank != 0)
            if sampling is not None:  # rank 0 alone can sample with it: plain tensors equal to the gathered EMA
                assert not isinstance(next(sampling.parameters()), DTensor)
                assert_close_dicts(sampling.state_dict(), ema, "rank-0 sampling copy")
            if strategy == "ddp":  # every replica holds the same weights
                assert equal_across_ranks(run.model.parameters())
            if D.is_main(info):
                save_file(weights, str(out / f"{strategy}_model.safetensors"))
                save_file(ema, str(out / f"{strategy}_ema.safetensors"))
                torch.save(log, out / f"{strategy}_log.pt")
            D.barrier(info)
        # bf16 compute (FSDP2 MixedPrecisionPolicy) composed with activation checkpointing applied before fully_shard.
        bf16 = Run(build_config("tiny-t2v", TINY + [f"train.batch_size={PER_RANK_BATCH}", "train.precision=bf16",
                                                    "train.checkpointing=full"]), replace(info, strategy="fsdp"))
        bf16_losses = [bf16.step()[0] for _ in range(2)]
        if D.is_main(info):
            torch.save(bf16_losses, out / "fsdp_bf16_losses.pt")
    finally:
        D.destroy_distributed()


def counting_allreduce_hook(counter: list):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(state, bucket):
        counter.append(1)
        return allreduce_hook(dist.group.WORLD, bucket)

    return hook


# --------------------------------------------------------------------------------------------------- the tests

@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """1 process, the same global batch of 8: batch 4 x grad_accum 2 (the 2-rank run is 2 x 2 x 2 ranks)."""
    info = D.init_distributed("auto", device="cpu")
    assert info == D.DistInfo(0, 1, 0, torch.device("cpu"), "none")
    run = Run(tiny_config(PER_RANK_BATCH * WORLD), info)
    losses, saved = [], {}
    for _ in range(STEPS):
        if run.state.step == SAVE_AT:
            saved = {"model": {n: p.detach().clone() for n, p in run.model.named_parameters()},
                     "optimizer": optimizer_state(run)}
        losses.append(run.step())
    return run, losses, saved


def assert_close_dicts(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=ATOL, rtol=1e-5, msg=f"{what}: {key}")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process(two_rank_runs, reference, strategy):
    run, losses, _ = reference
    weights = load_file(str(two_rank_runs / f"{strategy}_model.safetensors"))
    assert_close_dicts(load_file(str(two_rank_runs / f"{strategy}_export" / "model.safetensors")), weights, "export")
    assert_close_dicts(weights, {k: v.detach() for k, v in run.model.state_dict().items()}, f"{strategy} weights")
    ema = load_file(str(two_rank_runs / f"{strategy}_ema.safetensors"))
    assert_close_dicts(ema, run.ema.model.state_dict(), f"{strategy} EMA")
    log = torch.load(two_rank_runs / f"{strategy}_log.pt", weights_only=True)
    # Losses (all-reduced mean) and the global gradient norm (clip_grad_norm_ over DTensor shards under FSDP) agree.
    assert [x for pair in log["losses"] for x in pair] == pytest.approx([x for pair in losses for x in pair], rel=1e-5)
    assert max(norm for _, norm in losses) > run.config.train.grad_clip  # clipping was active
    # The weights moved: equal because the runs agree, not because nothing trained.
    start = Run(tiny_config(PER_RANK_BATCH * WORLD), D.init_distributed("none", device="cpu")).model.state_dict()
    assert any((weights[k] - start[k]).abs().max() > 1e-3 for k in start)


def test_fsdp_bf16_with_activation_checkpointing_trains_like_fp32(two_rank_runs):
    fp32 = [loss for loss, _ in torch.load(two_rank_runs / "fsdp_log.pt", weights_only=True)["losses"][:2]]
    bf16 = torch.load(two_rank_runs / "fsdp_bf16_losses.pt", weights_only=True)
    assert bf16 == pytest.approx(fp32, rel=2e-2) and bf16 != fp32  # bf16 really computed, and close


def test_gradient_sync_only_on_the_last_micro_batch(two_rank_runs):
    # DDP: no all-reduce during micro-batch 0 (grads still differ between ranks), all-reduce on the last (equal).
    (calls_0, equal_0), (calls_1, equal_1) = torch.load(two_rank_runs / "ddp_log.pt", weights_only=True)["sync"]
    assert (calls_0, equal_0) == (0, False)
    assert calls_1 > 0 and equal_1
    # FSDP2: no reduce-scatter (and no sharded gradient) until the last micro-batch, one per block + root after it.
    (calls_0, grads_0), (calls_1, grads_1) = torch.load(two_rank_runs / "fsdp_log.pt", weights_only=True)["sync"]
    assert (calls_0, grads_0) == (0, False)
    assert calls_1 >= 2 and grads_1  # 2 blocks (depth 1 = spatial + temporal) + root


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_checkpoint_from_two_ranks_resumes_in_one_process(two_rank_runs, reference, strategy):
    ref_run, ref_losses, saved = reference
    path = two_rank_runs / f"{strategy}_ckpt"
    assert {"model.safetensors", "ema.safetensors", "state.pt", "manifest.json"} <= {p.name for p in path.iterdir()}
    # The export is plain weights in the single-process key format.
    assert load_file(str(path / "model.safetensors")).keys() == ref_run.model.state_dict().keys()
    run = Run(tiny_config(PER_RANK_BATCH * WORLD), D.init_distributed("none", device="cpu"))
    run.resume(path)
    assert run.state.step == SAVE_AT
    assert_close_dicts({n: p.detach() for n, p in run.model.named_parameters()}, saved["model"], "resumed weights")
    assert_close_dicts(optimizer_state(run), saved["optimizer"], "resumed optimizer state")
    # The resumed 1-process run continues exactly like the run that never stopped (data position, schedule, noise).
    assert run.step() == pytest.approx(ref_losses[SAVE_AT], rel=1e-5)
    assert_close_dicts(run.model.state_dict(), ref_run.model.state_dict(), "weights after the resumed step")


def test_setup_errors_are_one_line(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(D.DistributedError, match="dist.strategy=fsdp needs the torchrun environment"):
        D.init_distributed("fsdp", device="cpu")
    with pytest.raises(D.DistributedError, match="dist.strategy: got 'zero3'"):
        D.init_distributed("zero3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(D.DistributedError, match="RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT is not"):
        D.init_distributed("ddp", device="cpu")
    monkeypatch.setenv("RANK", "0"), monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1"), monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(D.DistributedError, match="dist.strategy=none under torchrun with WORLD_SIZE=2"):
        D.init_distributed("none", device="cpu")
    with pytest.raises(D.DistributedError, match="does not split over 2 ranks"):
        D.local_data_state({"epoch": 0, "position": 3}, D.DistInfo(0, 2, 0, torch.device("cpu"), "ddp"))


def test_global_sample_index_covers_the_one_process_step():
    """Over ranks, micro-batches and rows, step s covers exactly the 1-process step's indices; ResumableSampler(block=b) gives each
    rank the data items of its indices (order[g]), so data and per-sample noise match the 1-process run."""
    b, accum, world, size = 3, 2, 2, 30
    for step in range(2):
        indices = [D.global_sample_index(step, m, r, row, b, accum, world)
                   for m in range(accum) for r in range(world) for row in range(b)]
        assert sorted(indices) == list(range(step * b * accum * world, (step + 1) * b * accum * world))
    one = ResumableSampler(size, seed=3, block=b * world).epoch_order(0)
    for rank in range(world):
        share = ResumableSampler(size, seed=3, rank=rank, world_size=world, block=b).epoch_order(0)
        for k, item in enumerate(share):
            step, within = divmod(k, b * accum)
            micro, row = divmod(within, b)
            assert item == one[D.global_sample_index(step, micro, rank, row, b, accum, world)]
