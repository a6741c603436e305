"""Weight interop with diffusers' `LatteTransformer3DModel` (norm_type "ada_norm_single", the Latte-1 layout).

Both directions are pure key/tensor maps: our fused projections (attn.qkv, cross_attn.kv) are diffusers' separate
to_q/to_k/to_v concatenated along the output dimension. diffusers is the reference implementation: tests check that
the same weights give the same outputs.
"""
import torch

# (our name, diffusers name) for modules outside the blocks; ".weight"/".bias" are appended.
TOP_LEVEL = [
    ("patch_embed", "pos_embed.proj"),
    ("conditioning.t_embedder.mlp.0", "adaln_single.emb.timestep_embedder.linear_1"),
    ("conditioning.t_embedder.mlp.2", "adaln_single.emb.timestep_embedder.linear_2"),
    ("conditioning.t_block.1", "adaln_single.linear"),
    ("conditioning.caption_projection.mlp.0", "caption_projection.linear_1"),
    ("conditioning.caption_projection.mlp.2", "caption_projection.linear_2"),
    ("final_layer.linear", "proj_out"),
]
# Inside a block: (our name, diffusers names concatenated along dim 0).
BLOCK = [
    ("attn.qkv", ("attn1.to_q", "attn1.to_k", "attn1.to_v")),
    ("attn.proj", ("attn1.to_out.0",)),
    ("cross_attn.q", ("attn2.to_q",)),
    ("cross_attn.kv", ("attn2.to_k", "attn2.to_v")),
    ("cross_attn.proj", ("attn2.to_out.0",)),
    ("mlp.fc1", ("ff.net.0.proj",)),
    ("mlp.fc2", ("ff.net.2",)),
]


def diffusers_block_prefix(index: int) -> str:
    """Our blocks[2i] is diffusers' transformer_blocks[i]; blocks[2i+1] is temporal_transformer_blocks[i]."""
    kind = "transformer_blocks" if index % 2 == 0 else "temporal_transformer_blocks"
    return f"{kind}.{index // 2}"


def to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our text-to-video Latte state dict -> a diffusers LatteTransformer3DModel state dict."""
    out = {"scale_shift_table": state["final_layer.modulation.scale_shift_table"]}
    for ours, theirs in TOP_LEVEL:
        for suffix in ("weight", "bias"):
            out[f"{theirs}.{suffix}"] = state[f"{ours}.{suffix}"]
    depth = 1 + max(int(key.split(".")[1]) for key in state if key.startswith("blocks."))
    for index in range(depth):
        prefix, theirs_prefix = f"blocks.{index}", diffusers_block_prefix(index)
        out[f"{theirs_prefix}.scale_shift_table"] = state[f"{prefix}.modulation.scale_shift_table"]
        for ours, parts in BLOCK:
            if f"{prefix}.{ours}.weight" not in state:
                continue  # temporal blocks have no cross-attention
            for suffix in ("weight", "bias"):
                chunks = state[f"{prefix}.{ours}.{suffix}"].chunk(len(parts), dim=0)
                for part, chunk in zip(parts, chunks):
                    out[f"{theirs_prefix}.{part}.{suffix}"] = chunk.clone()
    return out


def from_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers LatteTransformer3DModel state dict -> our text-to-video Latte state dict."""
    out = top_level_from_diffusers(state)
    for index in range(2 * diffusers_depth(state)):
        out.update(block_from_diffusers(state, index, diffusers_block_prefix(index)))
    return out


def diffusers_depth(state: dict[str, torch.Tensor]) -> int:
    """Number of (spatial) transformer_blocks in a diffusers Latte or PixArt state dict."""
    return 1 + max(int(key.split(".")[1]) for key in state if key.startswith("transformer_blocks."))


def top_level_from_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Patch embedding, timestep / caption embedders and final layer: the same keys in Latte-1 and PixArt-alpha."""
    out = {"final_layer.modulation.scale_shift_table": state["scale_shift_table"]}
    for ours, theirs in TOP_LEVEL:
        for suffix in ("weight", "bias"):
            out[f"{ours}.{suffix}"] = state[f"{theirs}.{suffix}"]
    return out


def block_from_diffusers(state: dict[str, torch.Tensor], index: int, theirs_prefix: str) -> dict[str, torch.Tensor]:
    """Our blocks[index] from the diffusers block whose keys start with `theirs_prefix`."""
    prefix = f"blocks.{index}"
    out = {f"{prefix}.modulation.scale_shift_table": state[f"{theirs_prefix}.scale_shift_table"]}
    for ours, parts in BLOCK:
        if f"{theirs_prefix}.{parts[0]}.weight" not in state:
            continue  # temporal blocks have no cross-attention
        for suffix in ("weight", "bias"):
            out[f"{prefix}.{ours}.{suffix}"] = torch.cat([state[f"{theirs_prefix}.{p}.{suffix}"] for p in parts])
    return out


def diffusers_config(model_config, frames: int, sample_size: int) -> dict:
    """The LatteTransformer3DModel config equal to our ModelConfig (Latte-1 settings)."""
    cfg = model_config
    if cfg.kind != "t2v" or cfg.pooled_caption or cfg.caption_adaln:
        raise ValueError("diffusers export: only the text-to-video Latte without model.pooled_caption and "
                         "model.caption_adaln has a diffusers equivalent (got model.kind="
                         f"{cfg.kind!r}, model.pooled_caption={cfg.pooled_caption}, model.caption_adaln={cfg.caption_adaln})")
    return dict(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=cfg.in_channels, out_channels=cfg.in_channels * (2 if cfg.learn_sigma else 1),
        num_layers=cfg.depth, cross_attention_dim=cfg.hidden_size, attention_bias=True, sample_size=sample_size,
        patch_size=cfg.patch_size, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=cfg.norm_eps,
        caption_channels=cfg.caption_channels, video_length=frames,
    )


def model_fields_from_diffusers(config: dict) -> dict:
    """ModelConfig fields for a diffusers LatteTransformer3DModel or PixArtTransformer2DModel config (the same keys);
    raises on settings we do not implement. A config we exported with zero sigma channels (engine/export.py) gives
    learn_sigma=False."""
    expected = {"norm_type": "ada_norm_single", "activation_fn": "gelu-approximate", "norm_elementwise_affine": False,
                "attention_bias": True}
    for key, value in expected.items():
        if config.get(key, value) != value:
            raise ValueError(f"diffusers config {key}={config.get(key)!r}: Ristretto's Latte needs {value!r}")
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    if config.get("cross_attention_dim") not in (None, heads * head_dim):
        raise ValueError(f"diffusers config cross_attention_dim={config['cross_attention_dim']}: Ristretto's Latte "
                         f"needs the model width {heads * head_dim}")
    out_channels = config.get("out_channels") or config["in_channels"]
    padded = config.get("_ristretto", {}).get("zero_sigma_channels", False)
    return dict(kind="t2v", hidden_size=heads * head_dim, num_heads=heads, depth=config["num_layers"],
                in_channels=config["in_channels"], learn_sigma=out_channels == 2 * config["in_channels"] and not padded,
                patch_size=config["patch_size"], caption_channels=config["caption_channels"],
                norm_eps=config.get("norm_eps", 1e-5), mlp_ratio=4.0, pooled_caption=False, caption_adaln=False)


def add_zero_sigma_channels(state: dict[str, torch.Tensor], channels: int) -> dict[str, torch.Tensor]:
    """proj_out of a model without learned sigma, widened to 2x channels whose sigma half is zero: diffusers'
    LattePipeline always keeps the first half of the output channels. Features are ordered (p, q, channel)."""
    out = dict(state)
    for suffix in ("weight", "bias"):
        tensor = state[f"proj_out.{suffix}"]
        per_position = tensor.reshape(-1, channels, *tensor.shape[1:])  # (p*p, C, ...)
        out[f"proj_out.{suffix}"] = torch.cat([per_position, torch.zeros_like(per_position)], 1).flatten(0, 1)
    return out


def drop_zero_sigma_channels(state: dict[str, torch.Tensor], channels: int) -> dict[str, torch.Tensor]:
    """The inverse of add_zero_sigma_channels."""
    out = dict(state)
    for suffix in ("weight", "bias"):
        tensor = state[f"proj_out.{suffix}"]
        out[f"proj_out.{suffix}"] = tensor.reshape(-1, 2 * channels, *tensor.shape[1:])[:, :channels].flatten(0, 1)
    return out
