"""Peak training memory per config and checkpointing mode, measured vs the planner (engine/plan.py).

    python -m ristretto.bench.memory [--out DIR] [--configs xl2,xl2-t2v,t2v512] [--modes none,full,...]
        [--precision bf16] [--attention sdpa] [--no-fit] [--snapshot] [--smoke]

GPU: per config x mode, build the training model (engine/build, EMA included), run two real optimizer steps
(micro_step_loss + backward + clip + AdamW + EMA, as engine/train does) and compare torch.cuda.max_memory_allocated
with the plan's peak. Then the largest batch that fits the device: the planner's answer, and the measured one found by
trying batches upward from the planner's answer (or downward when it does not fit) until one runs out of memory.
`--snapshot` records the allocator history of the first step of each case (torch.cuda.memory._record_memory_history)
and dumps it beside the JSON as memory_snapshot_<config>_<mode>.pickle, for https://pytorch.org/memory_viz
(a pickle: open it only in that viewer, never load one you were handed).

Without CUDA (smoke): tiny configs, and the bytes autograd saves for backward during one training forward
(torch.autograd.graph.saved_tensors_hooks, distinct storages, parameters excluded) vs the plan's activation bytes;
plus the planner's largest batch per mode for the GPU configs, plus (`--layers`, on by default in the smoke run) the
per-layer comparison with diffusers at Latte width (bench/layer_memory.py: bytes saved for backward per token per
layer, bf16 autocast). Writes a table, JSON (memory_<device>.json), a chart.
"""
import argparse
import copy
import gc
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # the per-layer rows run Triton kernels: on a CPU in the interpreter, chosen before any kernel is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ristretto.bench.common import RESULTS_DIR, format_table, write_report  # noqa: E402
from ristretto.bench.layer_memory import layer_rows, saved_storage_bytes
from ristretto.bench.step import CONFIGS, StepConfig, cpu_threads, random_inputs
from ristretto.engine.build import build_training_model
from ristretto.engine.checkpointing import AUTO, CHECKPOINTING_MODES
from ristretto.engine.config import build_config
from ristretto.engine.diffusion import Diffusion
from ristretto.engine.plan import GIB, largest_that_fits, predict_memory
from ristretto.engine.progress import progress_bar
from ristretto.engine.train import TrainState, build_optimizer, micro_step_loss, update_step

MEMORY_OVERRIDES = ("data.kind=cached",)  # latents are given: no encoders (the plan then counts none either)
SMOKE_CONFIGS = [
    StepConfig("tiny-t2v", "tiny-t2v", ("train.batch_size=2", "data.frames=4")),
    StepConfig("tiny-class sigma", "tiny-class", ("train.batch_size=2", "data.frames=4", "model.learn_sigma=true")),
    StepConfig("small-t2v", "tiny-t2v", ("train.batch_size=2", "model.hidden_size=128", "model.depth=3",
                                         "data.resolution=64", "data.frames=4")),
]
MAX_PROBES = 12  # batch sizes tried per measured fit


BENCH_MODES = (*CHECKPOINTING_MODES, AUTO)


def case_config(step_config: StepConfig, mode: str, precision: str, attention: str, batch: int | None = None,
                device_type: str = "cuda"):
    overrides = [*MEMORY_OVERRIDES, *step_config.overrides, f"train.checkpointing={mode}",
                 f"train.precision={precision}", f"model.attention_backend={attention}"]
    if batch:
        overrides.append(f"train.batch_size={batch}")
    config = build_config(step_config.preset, overrides)
    if mode == AUTO and device_type == "cpu":  # no GPU to fill: a budget halfway between no and full recompute
        ends = [predict_memory(build_config(step_config.preset, [*overrides, f"train.checkpointing={m}"]), "cpu")
                for m in ("none", "full")]
        config.train.memory_budget_gb = sum(plan.required_bytes for plan in ends) / 2 / GIB
    return config


# ------------------------------------------------------------------------------------------------ measuring

def measure_saved_bytes(config, device=torch.device("cpu")) -> int:
    """What one training forward (engine/train.micro_step_loss) of `config` keeps for backward, in bytes."""
    torch.manual_seed(config.train.seed)
    no_ema = copy.deepcopy(config)
    if config.train.checkpointing != AUTO:  # auto's choice depends on the EMA's memory: keep it there
        no_ema.train.ema_decay = 0.0  # the EMA copy is weights, not activations
    model, _, precision = build_training_model(no_ema, device)
    latents, _, conditions = random_inputs(config, config.train.batch_size, device)
    diffusion = Diffusion(config.diffusion)
    return saved_storage_bytes(
        model, lambda: micro_step_loss(model, diffusion, precision, latents, conditions, 0, config))


class TrainingSteps:
    """A built training setup that runs real optimizer steps at any batch size (the model does not depend on it)."""

    def __init__(self, config, device):
        self.config, self.device = config, device
        self.model, self.ema, self.precision = build_training_model(config, device)
        self.optimizer, self.scheduler = build_optimizer(self.model, config.train)
        self.diffusion, self.state = Diffusion(config.diffusion), TrainState()

    def run(self, batch: int, steps: int = 2) -> None:
        latents, _, conditions = random_inputs(self.config, batch, self.device)
        accum = self.config.train.grad_accum
        for _ in range(steps):
            loss_sum = 0.0
            for micro in range(accum):
                loss = micro_step_loss(self.model, self.diffusion, self.precision, latents, conditions,
                                       micro * batch, self.config)
                (loss / accum).backward()
                loss_sum += float(loss.detach())
            update_step(self.model, self.optimizer, self.scheduler, self.ema, self.state, self.config.train,
                        loss_sum / accum)
            self.state.step += 1


def free_cuda() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def measured_peak(steps: TrainingSteps, batch: int, snapshot: Path | None = None) -> int:
    """max_memory_allocated over two optimizer steps at `batch` (optimizer state and EMA included)."""
    free_cuda()
    torch.cuda.reset_peak_memory_stats()
    if snapshot is not None:
        torch.cuda.memory._record_memory_history(max_entries=200_000)
    try:
        steps.run(batch)
    finally:
        if snapshot is not None:
            torch.cuda.memory._dump_snapshot(str(snapshot))
            torch.cuda.memory._record_memory_history(enabled=None)
    return torch.cuda.max_memory_allocated()


def runs(steps: TrainingSteps, batch: int) -> bool:
    """Whether two optimizer steps at `batch` fit in the device's memory."""
    try:
        measured_peak(steps, batch)
        return True
    except torch.OutOfMemoryError:
        steps.optimizer.zero_grad(set_to_none=True)
        free_cuda()
        return False


def measured_largest_batch(steps: TrainingSteps, start: int) -> int | None:
    """Walk from the planner's answer to the largest batch that runs: up while it fits, down while it does not."""
    batch = max(1, start)
    if runs(steps, batch):
        for _ in range(MAX_PROBES):
            if not runs(steps, batch + 1):
                return batch
            batch += 1
        return batch  # still fitting after MAX_PROBES: report the last that ran
    for _ in range(MAX_PROBES):
        batch -= 1
        if batch < 1:
            return None
        if runs(steps, batch):
            return batch
    return None


# --------------------------------------------------------------------------------------------------- cases

def gpu_row(step_config: StepConfig, mode: str, args, out_dir: Path) -> dict:
    config = case_config(step_config, mode, args.precision, args.attention)
    plan = predict_memory(config, "cuda")
    row = {"config": step_config.label, "checkpointing": mode, "batch": config.train.batch_size,
           "planned GiB": plan.peak_bytes / GIB}
    device = torch.device("cuda")
    total = torch.cuda.mem_get_info(device)[1]
    try:
        steps = TrainingSteps(config, device)
        snapshot = out_dir / f"memory_snapshot_{step_config.label.replace(' ', '_')}_{mode}.pickle" \
            if args.snapshot else None
        peak = measured_peak(steps, config.train.batch_size, snapshot)
        row.update({"measured GiB": peak / GIB, "planned/measured": plan.peak_bytes / peak})
    except torch.OutOfMemoryError:
        row["note"] = "out of memory at the preset batch"
        free_cuda()
        steps = None
    if args.fit:
        planned = largest_that_fits(config, "batch", total, "cuda")
        row["planned largest batch"] = planned
        if steps is not None:
            row["measured largest batch"] = measured_largest_batch(steps, planned or 1)
    del steps
    free_cuda()
    return row


def smoke_row(step_config: StepConfig, mode: str, precision: str, attention: str) -> dict:
    config = case_config(step_config, mode, precision, attention, device_type="cpu")
    measured = measure_saved_bytes(config)
    planned = predict_memory(config, "cpu").activation_bytes
    return {"config": step_config.label, "checkpointing": mode, "batch": config.train.batch_size,
            "planned MiB": planned / 2**20, "measured MiB": measured / 2**20, "planned/measured": planned / measured}


def planner_fit_rows(args, gpu_gib: float) -> list[dict]:
    """The planner's largest batch per mode for the GPU configs (cheap: no model is built)."""
    rows = []
    for name in args.configs:
        for mode in args.modes:
            config = case_config(CONFIGS[name], mode, "bf16", "sdpa")
            rows.append({"config": CONFIGS[name].label, "checkpointing": mode,
                         f"planned largest batch ({gpu_gib:g} GiB)": largest_that_fits(config, "batch", gpu_gib * GIB)})
    return rows


def run(args) -> dict:
    cuda = torch.cuda.is_available() and not args.smoke
    out_dir = Path(args.out) if args.out is not None else RESULTS_DIR
    precision = args.precision
    if cuda:
        rows = [gpu_row(CONFIGS[name], mode, args, out_dir)
                for name in progress_bar(args.configs, desc="memory", unit="config") for mode in args.modes]
        fit_rows = []
    else:
        # fp32 on CPU: bf16 autocast is slow there (tests/engine/test_plan.py checks a bf16 case too)
        precision = "fp32" if precision == "bf16" else precision
        rows = [smoke_row(config, mode, precision, args.attention)
                for config in progress_bar(SMOKE_CONFIGS, desc="memory", unit="config") for mode in args.modes]
        fit_rows = planner_fit_rows(args, 80.0) if args.fit else []
    print(format_table(rows))
    if fit_rows:
        print(format_table(fit_rows))
    per_layer = []
    if not cuda and args.layers:
        per_layer = layer_rows(args.layer_frames, args.triton_frames, args.residual_dtypes)
        print("bytes saved for backward per token per layer (bf16 autocast, width 1152 = 16 x 72, 16x16 latents, "
              "caption 120 x 4096; depth 2 - depth 1, batch 2 - batch 1):")
        print(format_table(per_layer))
    payload = {"config": {"smoke": not cuda, "precision": precision, "attention": args.attention,
                          "measured": "torch.cuda.max_memory_allocated over 2 optimizer steps" if cuda
                          else "bytes saved for backward (saved_tensors_hooks) in one training forward"},
               "rows": rows, "planner_fit": fit_rows, "per_layer_vs_diffusers": per_layer}
    if rows:  # on a CPU too, to runs/bench/ unless --out: its JSON says "smoke": true
        unit = "GiB" if cuda else "MiB"
        labels = [f"{r['config']} {r['checkpointing']}" for r in rows]
        series = {kind: [r.get(f"{kind} {unit}") or 0.0 for r in rows] for kind in ("planned", "measured")}
        write_report("memory", payload, args.out, labels, series, unit, "memory, planned vs measured")
    return payload


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help=f"results folder (default {RESULTS_DIR} on a GPU)")
    parser.add_argument("--configs", type=lambda s: s.split(","), default=list(CONFIGS),
                        help=f"comma-separated GPU configs from {', '.join(CONFIGS)}")
    parser.add_argument("--modes", type=lambda s: s.split(","), default=list(BENCH_MODES),
                        help="comma-separated train.checkpointing modes (auto: the GPU's memory; on CPU a budget "
                             "halfway between none and full)")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp8-ao", "fp8-te"])
    parser.add_argument("--attention", default="sdpa", help="model.attention_backend")
    parser.add_argument("--no-fit", dest="fit", action="store_false", help="skip the largest-batch search")
    parser.add_argument("--snapshot", action="store_true", help="dump allocator snapshots for pytorch.org/memory_viz")
    parser.add_argument("--smoke", action="store_true", help="the CPU saved-tensor check (always on without a GPU)")
    parser.add_argument("--no-layers", dest="layers", action="store_false",
                        help="skip the per-layer comparison with diffusers (smoke run, ~2-6 CPU minutes)")
    parser.add_argument("--layer-frames", type=int, default=16, help="frames of the per-layer comparison (16)")
    parser.add_argument("--triton-frames", type=int, default=4,
                        help="frames for kernels=triton (the interpreter is slow; per token is unchanged)")
    parser.add_argument("--residual-dtypes", type=lambda s: s.split(","), default=["fp32", "bf16"],
                        help="train.residual_dtype values to compare (comma-separated)")
    args = parser.parse_args(argv)
    bad = [m for m in args.modes if m not in BENCH_MODES] + [c for c in args.configs if c not in CONFIGS]
    if bad:
        parser.error(f"unknown modes/configs {bad}; modes: {', '.join(BENCH_MODES)}; "
                     f"configs: {', '.join(CONFIGS)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if torch.cuda.is_available() and not args.smoke:
        return run(args)
    with cpu_threads(1):
        return run(args)


if __name__ == "__main__":
    main()
