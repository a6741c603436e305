"""Bytes saved for backward per token per Latte layer: ours (kernels=torch / triton) against diffusers'
LatteTransformer3DModel, the comparison of issue 13 (part of `python -m ristretto.bench.memory --smoke`).

Method: torch.autograd.graph.saved_tensors_hooks around one model forward under bf16 autocast on CPU, counting the
distinct storages autograd keeps, parameters excluded. One layer = one spatial + one temporal block, taken as
depth 2 minus depth 1 so embeddings and the final layer cancel. Two numbers per model:
  per token      (batch 2 - batch 1) of that difference / tokens of one sample: only what grows with the tokens,
                 the number that decides what fits (constant terms such as autocast's bf16 weight copies cancel);
  incl. weights  the batch-1 difference / tokens, which also counts autocast's weight copies of the layer
                 (about 72 KiB per token at 1024 tokens, less per token at any larger batch).
Default size: Latte width 1152 = 16 heads x 72, 16 frames of 16x16 latents (patch 2: 1024 tokens per sample),
caption 120 x 4096. `frames` may be lowered to make the Triton interpreter tractable: per token stays comparable.
"""
import torch

from ristretto.engine.build import apply_residual_dtype, build_plain_model
from ristretto.engine.config import build_config
from ristretto.model.diffusers_interop import diffusers_config

KIB = 1024
LATTE_WIDTH = ["model.hidden_size=1152", "model.num_heads=16", "model.caption_channels=4096",
               "model.caption_length=120", "data.resolution=128", "data.kind=cached"]  # 128 px -> 16x16 latents


def layer_config(depth: int, frames: int, kernels: str, residual_dtype: str | None = None):
    overrides = [*LATTE_WIDTH, f"model.depth={depth}", f"data.frames={frames}", f"model.kernels={kernels}",
                 "train.precision=bf16"]
    if residual_dtype is not None:
        overrides.append(f"train.residual_dtype={residual_dtype}")
    return build_config("latte-t2v-512", overrides)


def saved_storage_bytes(model: torch.nn.Module, run) -> int:
    """Distinct storages autograd keeps while `run()` executes, parameters and buffers excluded."""
    excluded = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storages.values())


def inputs(batch: int, frames: int, seed: int = 0):
    """Latents [B, F, 4, 16, 16], timesteps [B], captions [B, 120, 4096] with a padding mask."""
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, frames, 4, 16, 16, generator=generator)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator)
    caption = torch.randn(batch, 120, 4096, generator=generator)
    mask = torch.arange(120)[None] < torch.tensor([[100]] * batch)
    return latents, timesteps, caption, mask


def ours_saved(depth: int, batch: int, frames: int, kernels: str, residual_dtype: str | None) -> int:
    config = layer_config(depth, frames, kernels, residual_dtype)
    torch.manual_seed(0)
    model = build_plain_model(config)
    apply_residual_dtype(model, config.train.residual_dtype, config.train.precision)
    latents, timesteps, caption, mask = inputs(batch, frames)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(latents, timesteps, caption=caption, caption_mask=mask)

    return saved_storage_bytes(model, run)


def diffusers_saved(depth: int, batch: int, frames: int) -> int:
    import diffusers  # noqa: PLC0415 - the reference, only for this comparison

    config = layer_config(depth, frames, "torch")
    torch.manual_seed(0)
    model = diffusers.LatteTransformer3DModel(**diffusers_config(config.model, frames, 16))
    latents, timesteps, caption, mask = inputs(batch, frames)
    bias = ((1.0 - mask.float()) * -10000.0).repeat_interleave(frames, dim=0)[:, None, :]  # see the interop test

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(latents.permute(0, 2, 1, 3, 4), timesteps, encoder_hidden_states=caption,
                  encoder_attention_mask=bias)

    return saved_storage_bytes(model, run)


def per_layer(measure, frames: int) -> dict:
    """KiB per token per layer from four forwards: depth 2 minus depth 1, at batch 2 minus batch 1."""
    tokens = frames * 64
    saved = {(depth, batch): measure(depth, batch) for depth in (1, 2) for batch in (1, 2)}
    one_sample = saved[2, 1] - saved[1, 1]
    second_sample = saved[2, 2] - saved[1, 2] - one_sample
    return {"KiB per token": second_sample / tokens / KIB, "KiB per token incl. weights": one_sample / tokens / KIB}


def layer_rows(frames: int = 16, triton_frames: int | None = None, residual_dtypes=("bf16",)) -> list[dict]:
    """The table: diffusers, then ours per kernel set and residual dtype, each with its ratio to diffusers measured
    at the same frame count (per token is what counts; `incl. weights` depends on the token count)."""
    references = {}

    def reference(count: int) -> dict:
        if count not in references:
            references[count] = per_layer(lambda depth, batch: diffusers_saved(depth, batch, count), count)
        return references[count]

    rows = [{"model": "diffusers LatteTransformer3DModel (SDPA)", "frames": frames, **reference(frames)}]
    for kernels in ("torch", "triton"):
        count = triton_frames if kernels == "triton" and triton_frames else frames
        for residual in residual_dtypes:
            row = per_layer(lambda depth, batch: ours_saved(depth, batch, count, kernels, residual), count)
            rows.append({"model": f"ours, kernels={kernels}, residual {residual}", "frames": count, **row})
    for row in rows:
        base = reference(row["frames"])
        row["vs diffusers"] = row["KiB per token"] / base["KiB per token"]
        row["vs diffusers incl. weights"] = row["KiB per token incl. weights"] / base["KiB per token incl. weights"]
    return rows
