"""The model's token shapes and its matmul FLOPs, counted analytically from a RunConfig (no model is built).

FLOPs are 2 per multiply-add of every matmul: patch embedding, conditioning MLPs, adaLN-Zero linears, each block's
qkv / attention (QK^T and PV) / proj / cross-attention / MLP, and the final linear. Elementwise work (norms, GELU,
softmax, residuals) is left out, as in the usual MFU convention (PaLM appendix B, nanoGPT's estimate_mfu).
Training FLOPs per sample are 3x forward (backward = 2x: input and weight gradients); recomputation by activation
checkpointing is not model work and is reported apart (`recompute_flops`), so MFU compares like with like.
Checked against torch.utils.flop_counter.FlopCounterMode by tests/engine/test_flops.py.
"""
from dataclasses import dataclass

from .build import latent_geometry

TIMESTEP_FEATURES = 256  # sinusoidal timestep features fed to the timestep MLP (model/embeddings.TimestepEmbedder)
TRAINING_FLOP_FACTOR = 3.0  # forward + backward (2x forward)


@dataclass(frozen=True)
class TokenGeometry:
    """Every size the memory and FLOP models need, for one micro-batch."""
    kind: str             # "t2v" | "class"
    batch: int            # B
    frames: int           # F video frames
    images: int           # I extra image frames (joint training)
    channels: int         # C latent channels
    size: int             # latent height = width
    patch: int            # p
    hidden: int           # D
    heads: int            # h
    mlp_hidden: int       # M = int(D * mlp_ratio)
    depth: int            # layers; 2 * depth blocks (spatial, temporal alternating)
    out_channels: int     # C_out (2C with learned sigma)
    caption_length: int   # L (0 for class conditioning)
    caption_channels: int  # Cc
    pooled_caption: bool
    learn_sigma: bool
    num_classes: int      # class-conditional label table size (0 for text)

    @property
    def tokens_per_frame(self) -> int:  # S = (H/p) * (W/p)
        return (self.size // self.patch) ** 2

    @property
    def spatial_rows(self) -> int:  # N of spatial blocks: B*(F+I) frames
        return self.batch * (self.frames + self.images)

    @property
    def temporal_rows(self) -> int:  # N of temporal blocks: B*S patch positions
        return self.batch * self.tokens_per_frame

    @property
    def spatial_tokens(self) -> int:
        return self.spatial_rows * self.tokens_per_frame

    @property
    def temporal_tokens(self) -> int:
        return self.temporal_rows * self.frames

    @property
    def context_rows(self) -> int:
        """Rows of the projected caption: one per sample, or one per frame when image frames bring captions."""
        return self.spatial_rows if self.images else self.batch

    @property
    def latent_elements(self) -> int:  # B*(F+I)*C*H*W: the size of one loss-side tensor
        return self.spatial_rows * self.channels * self.size * self.size


def token_geometry(config, batch: int | None = None) -> TokenGeometry:
    """The geometry of `config` for a micro-batch of `batch` samples (default train.batch_size)."""
    model, data = config.model, config.data
    channels, size = latent_geometry(config)
    t2v = model.kind == "t2v"
    return TokenGeometry(
        kind=model.kind, batch=batch or config.train.batch_size, frames=data.frames, images=data.num_images,
        channels=channels, size=size, patch=model.patch_size, hidden=model.hidden_size, heads=model.num_heads,
        mlp_hidden=int(model.hidden_size * model.mlp_ratio), depth=model.depth,
        out_channels=channels * (2 if model.learn_sigma else 1),
        caption_length=model.caption_length if t2v else 0, caption_channels=model.caption_channels if t2v else 0,
        pooled_caption=t2v and model.pooled_caption, learn_sigma=model.learn_sigma,
        num_classes=0 if t2v else model.num_classes)


def linear_flops(rows: int, fan_in: int, fan_out: int) -> float:
    return 2.0 * rows * fan_in * fan_out


def attention_flops(rows: int, queries: int, keys: int, hidden: int) -> float:
    """QK^T and PV summed over heads: 2 matmuls of 2 * Sq * Sk * head_dim per head and row."""
    return 4.0 * rows * queries * keys * hidden


def block_flops(g: TokenGeometry, spatial: bool) -> dict[str, float]:
    """Forward FLOPs of one spatial or temporal block, by part."""
    d = g.hidden
    rows, length = (g.spatial_rows, g.tokens_per_frame) if spatial else (g.temporal_rows, g.frames)
    tokens = rows * length
    parts = {
        "attention": linear_flops(tokens, d, 3 * d) + attention_flops(rows, length, length, d)
        + linear_flops(tokens, d, d),
        "mlp": linear_flops(tokens, d, g.mlp_hidden) + linear_flops(tokens, g.mlp_hidden, d),
    }
    if spatial and g.kind == "t2v":
        context_tokens = g.context_rows * g.caption_length
        parts["cross_attention"] = (linear_flops(tokens, d, d) + linear_flops(context_tokens, d, 2 * d)
                                    + attention_flops(rows, length, g.caption_length, d) + linear_flops(tokens, d, d))
    if g.kind == "class":  # adaLN-Zero: each block maps the condition [B, D] to 6 vectors
        parts["modulation"] = linear_flops(g.batch, d, 6 * d)
    return parts


def conditioning_flops(g: TokenGeometry) -> float:
    """Timestep MLP, and for text: the adaLN-single linear, caption projection (video + image captions), pooling."""
    d, b = g.hidden, g.batch
    flops = linear_flops(b, TIMESTEP_FEATURES, d) + linear_flops(b, d, d)
    if g.kind == "t2v":
        captions = b * (1 + g.images) * g.caption_length
        flops += linear_flops(b, d, 6 * d)  # adaLN-single
        flops += linear_flops(captions, g.caption_channels, d) + linear_flops(captions, d, d)
        flops += linear_flops(b, d, d) if g.pooled_caption else 0.0
    return flops


@dataclass
class FlopCount:
    """Forward matmul FLOPs of one micro-batch, by part (blocks summed over all layers)."""
    parts: dict[str, float]
    geometry: TokenGeometry

    @property
    def forward(self) -> float:
        return sum(self.parts.values())

    @property
    def training(self) -> float:
        """Model FLOPs of forward + backward (recomputation excluded)."""
        return TRAINING_FLOP_FACTOR * self.forward


def model_flops(config, batch: int | None = None) -> FlopCount:
    """Forward FLOPs of `config`'s model on one micro-batch, by part."""
    g = token_geometry(config, batch)
    d = g.hidden
    parts = {"patch_embed": linear_flops(g.spatial_tokens, g.channels * g.patch * g.patch, d),
             "conditioning": conditioning_flops(g)}
    for layout, spatial in (("spatial", True), ("temporal", False)):
        for part, flops in block_flops(g, spatial).items():
            parts[f"{layout}.{part}"] = g.depth * flops
    final_modulation = linear_flops(g.batch, d, 2 * d) if g.kind == "class" else 0.0
    parts["final"] = final_modulation + linear_flops(g.spatial_tokens, d, g.patch * g.patch * g.out_channels)
    return FlopCount(parts, g)


def checkpointed_blocks(depth: int, mode: str, every: int) -> tuple[int, int]:
    """(spatial, temporal) blocks that `mode` checkpoints whole (engine/checkpointing: blocks[::every] for every-k)."""
    if mode == "full":
        return depth, depth
    if mode == "every-k":
        chosen = range(0, 2 * depth, every)
        return sum(i % 2 == 0 for i in chosen), sum(i % 2 == 1 for i in chosen)
    return 0, 0


def recompute_flops(config, mode: str | None = None, batch: int | None = None) -> float:
    """Forward FLOPs that activation checkpointing `mode` (default train.checkpointing) runs again in backward."""
    mode = mode or config.train.checkpointing
    count = model_flops(config, batch)
    g = count.geometry
    if mode in ("full", "every-k"):
        spatial, temporal = checkpointed_blocks(g.depth, mode, config.train.checkpointing_every)
        per_spatial, per_temporal = (sum(block_flops(g, s).values()) for s in (True, False))
        return spatial * per_spatial + temporal * per_temporal
    recomputed = {"selective-mlp": ("mlp",), "selective-attention": ("attention", "cross_attention")}.get(mode, ())
    return sum(flops for name, flops in count.parts.items() if name.split(".")[-1] in recomputed)
