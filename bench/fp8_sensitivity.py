"""Which linears does FP8 hurt most? Gradient error of emulated FP8 on one group of block linears at a time.

`python -m ristretto.bench.fp8_sensitivity --preset synthetic-proof [--weights RUN/checkpoints/step_N/model.safetensors]
[--seed S] [--recipe tensorwise] [--batches 4] [--set key=value ...] [--out DIR]`: prints the table and writes it as
JSON (with the environment) to DIR/fp8_sensitivity_<device>.json (default runs/bench).

Method: the model (fresh, or a run's weights: a trained state is what matters) takes `--batches` fixed training batches
under bf16 autocast; for each group (all FP8-eligible block linears, then each linear kind, spatial/temporal blocks,
first+last block) the same batches run with only that group converted to torchao's emulated float8
(`precision.convert_to_ao`). Printed per group: the relative gradient error ||g - g_bf16|| / ||g_bf16|| over all
parameters (mean over batches) and the loss change; fp32 (no autocast) against bf16 is the scale of bf16's own error.
Every variant uses the same timesteps, noise and caption dropout as training would (train.micro_step_loss).
docs/precision.md ("Which linears hurt") holds a measured table.
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch

from ristretto.bench.common import format_table, write_results
from ristretto.engine.build import apply_residual_dtype, build_plain_model
from ristretto.engine.config import build_config
from ristretto.engine.datasets import build_dataset
from ristretto.engine.diffusion import Diffusion
from ristretto.engine.precision import Precision, convert_to_ao, fp8_linear_names
from ristretto.engine.train import build_encoders, encode_batch, micro_step_loss

LINEAR_KINDS = ("attn.qkv", "attn.proj", "cross_attn.q", "cross_attn.kv", "cross_attn.proj", "mlp.fc1", "mlp.fc2")


def block_index(name: str) -> int:
    return int(name.split(".")[1])  # blocks.<i>.…


def linear_kind(name: str) -> str:
    return name.split(".", 2)[2]  # blocks.<i>.<kind>


def groups(depth: int) -> dict[str, Callable[[str], bool]]:
    """Label -> which FP8-eligible linear names the group converts (blocks alternate spatial, temporal)."""
    last = 2 * depth - 1
    chosen = {"all block linears": lambda name: True}
    for kind in LINEAR_KINDS:
        chosen[f"{kind} only"] = lambda name, kind=kind: linear_kind(name) == kind
    chosen["spatial blocks only"] = lambda name: block_index(name) % 2 == 0
    chosen["temporal blocks only"] = lambda name: block_index(name) % 2 == 1
    chosen["first + last block only"] = lambda name: block_index(name) in (0, last)
    chosen["all but first + last block"] = lambda name: block_index(name) not in (0, last)
    return chosen


def fixed_batches(config, count: int) -> list[tuple[torch.Tensor, dict]]:
    dataset = build_dataset(config)
    encoders = build_encoders(config, dataset, torch.device("cpu"))
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.train.batch_size, shuffle=False)
    batches = iter(loader)
    return [encode_batch(next(batches), encoders, config, torch.device("cpu")) for _ in range(count)]


def gradients(config, state: dict, batches, diffusion, fp8: Callable[[str], bool] | None, recipe: str,
              precision: str = "bf16") -> tuple[list[torch.Tensor], float, int]:
    """Flat gradient per batch, mean loss and how many linears ran in FP8, for the model at `state`."""
    model = build_plain_model(config)
    model.load_state_dict(state)
    names = [name for name in fp8_linear_names(model) if fp8(name)] if fp8 is not None else []
    if names:
        convert_to_ao(model, recipe, names, emulate=True)
    apply_residual_dtype(model, config.train.residual_dtype, precision)
    context = Precision(name=precision, device_type="cpu")
    grads, losses = [], []
    for index, (latents, conditions) in enumerate(batches):
        model.zero_grad()
        loss = micro_step_loss(model, diffusion, context, latents, conditions, index * len(latents), config)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    return grads, sum(losses) / len(losses), len(names)


def sensitivity(config, state: dict, recipe: str = "tensorwise", batches: int = 4) -> list[dict]:
    """One row per group: label, linears, grad_error (relative to bf16), loss_change (relative)."""
    data, diffusion = fixed_batches(config, batches), Diffusion(config.diffusion)
    reference, reference_loss, _ = gradients(config, state, data, diffusion, None, recipe)
    variants = {"fp32 (no autocast), for scale": (None, "fp32")}
    variants.update({f"FP8 {label}": (chosen, "bf16") for label, chosen in groups(config.model.depth).items()})
    rows = []
    for label, (chosen, precision) in variants.items():
        grads, loss, count = gradients(config, state, data, diffusion, chosen, recipe, precision)
        error = sum(((g - r).norm() / r.norm()).item() for g, r in zip(grads, reference)) / len(reference)
        rows.append({"group": label, "linears": count, "grad_error": error, "loss_change": loss / reference_loss - 1})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="synthetic-proof")
    parser.add_argument("--weights", default="", help="a run's model.safetensors (default: fresh weights)")
    parser.add_argument("--seed", type=int, default=0, help="train.seed: weights (when fresh), timesteps and noise")
    parser.add_argument("--recipe", default="tensorwise")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default=None, help="folder for the JSON (default runs/bench)")
    args = parser.parse_args(argv)
    config = build_config(args.preset, [f"train.seed={args.seed}", *args.overrides])
    torch.manual_seed(args.seed)
    if args.weights:
        from safetensors.torch import load_file  # noqa: PLC0415
        state = load_file(args.weights)
    else:
        state = build_plain_model(config).state_dict()
    rows = sensitivity(config, state, args.recipe, args.batches)
    print(format_table(rows))
    print(write_results("fp8_sensitivity", {"preset": args.preset, "weights": args.weights, "seed": args.seed,
                                            "recipe": args.recipe, "batches": args.batches,
                                            "overrides": args.overrides, "rows": rows}, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
