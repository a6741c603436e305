"""Typed run configuration: dataclass trees, named presets and `--set key=value` overrides.

Every field has a docstring-style comment under it. `apply_override` type-checks a value against the field's type
and rejects unknown keys; `validate` checks choices and cross-field rules. Errors are `ConfigError` with one line
naming the key and what was expected, so the CLI can print it and exit non-zero.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A user mistake in the configuration: one line naming the key and what was expected."""


@dataclass
class ModelConfig:
    kind: str = "t2v"
    """"t2v": text-to-video Latte-1 (cross-attention, adaLN-single); "class": class-conditional Latte-XL (adaLN-Zero)."""
    in_channels: int = 3
    """Channels of the (latent) video: 3 for pixel space, 4 for the SD VAE."""
    learn_sigma: bool = False
    """Predict the variance too (out channels = 2 * in_channels) with the variational-bound loss term."""
    patch_size: int = 2
    """Spatial patch size p: tokens per frame = (H/p) * (W/p)."""
    hidden_size: int = 64
    """Transformer width D."""
    depth: int = 2
    """Number of layers; each layer is one spatial block followed by one temporal block (Latte-1: 28)."""
    num_heads: int = 4
    """Attention heads; head dim = hidden_size / num_heads (Latte: 72)."""
    mlp_ratio: float = 4.0
    """MLP hidden width = mlp_ratio * hidden_size."""
    caption_channels: int = 32
    """Width of the text encoder's embeddings (T5-XXL: 4096)."""
    caption_length: int = 16
    """Captions are padded or cut to this many tokens (Latte: 120)."""
    num_classes: int = 0
    """Number of classes for kind="class" (UCF-101: 101); index num_classes is the null class used for CFG."""
    norm_eps: float = 1e-6
    """LayerNorm epsilon (Latte: 1e-6)."""
    pooled_caption: bool = False
    """Also add a mean-pooled caption vector to the timestep embedding (helps small models learn captions)."""
    caption_adaln: bool = False
    """Also modulate every block by its own projection of the pooled caption (zero-initialised, beside adaLN-single):
    lets small models turn caption words into layout and motion (docs/proof.md)."""
    attention_backend: str = "sdpa"
    """sdpa | sdpa-flash | sdpa-cudnn | sdpa-efficient | sdpa-math | fa4 | fa3 | fa2 | xformers."""
    temporal_attention: str = "attention_backend"
    """Attention across frames: "attention_backend" (model.attention_backend on q, k, v copied into [B*S, F] frame
    sequences) or "triton" (kernels/temporal_attention.py: reads them in place, no copies). The default stays
    attention_backend until the Triton kernel is measured faster on a GPU (bench/attention.py)."""
    kernels: str = "torch"
    """Fused ops: "triton" (Triton kernels) or "torch" (the pure-torch reference)."""
    vae: str = "identity"
    """"identity" (pixel space) or a diffusers AutoencoderKL path / hub id (e.g. stabilityai/sd-vae-ft-ema)."""
    vae_scaling_factor: float = 0.18215
    """Latents are multiplied by this after encoding (SD VAE: 0.18215)."""
    text_encoder: str = "synthetic"
    """"synthetic" (built-in fixed word vectors, offline) or a transformers T5EncoderModel path / hub id."""
    # --- pretrained start (engine/pretrained.py) ---
    init: str = ""
    """Start from these weights: a diffusers LatteTransformer3DModel folder (or a pipeline folder with transformer/),
    or one of our run / weights / checkpoint / export folders. The model-shape fields above come from it; position
    embeddings follow data.frames and data.resolution, which may differ from the pretrained model's."""
    init_spatial: str = ""
    """Start the spatial blocks, patch embedding, timestep and caption embedders and final layer from a diffusers
    PixArtTransformer2DModel folder (PixArt-alpha / -Sigma); temporal blocks start as the identity."""
    freeze: str = "none"
    """none | spatial: train only the temporal blocks (everything else gets no gradient and no optimizer state)."""


@dataclass
class DataConfig:
    kind: str = "synthetic"
    """synthetic | captioned | class_folders | cached."""
    frames: int = 8
    """Video frames per sample."""
    resolution: int = 32
    """Frame height = width in pixels."""
    num_images: int = 0
    """Extra single-image frames per sample for joint image+video training (0 = video only)."""
    manifest: str = ""
    """CSV or JSONL manifest (path,caption[,start,end]) for kind=captioned."""
    root: str = ""
    """Folder the manifest's paths are relative to, or the class-folder root for kind=class_folders."""
    image_root: str = ""
    """Image folder for joint training (empty: draw the extra frames from other videos)."""
    cache_dir: str = ""
    """Folder of cached latents + embeddings for kind=cached (written by `python -m ristretto.engine.cache`)."""
    frame_stride: int = 1
    """Take every k-th decoded frame."""
    random_crop: bool = True
    """Random spatial crop (else center crop) after resizing the short side."""
    num_workers: int = 0
    """DataLoader worker processes (0: load in the training process; the synthetic clips need none, decoded video
    needs several per GPU or the GPU waits for data: the Latte presets use 8)."""
    prefetch_factor: int = 4
    """Batches each worker loads ahead (with num_workers > 0)."""
    pin_memory: bool = True
    """Pin batches in page-locked memory on CUDA, so their copies to the GPU are asynchronous."""
    persistent_workers: bool = True
    """Keep the workers alive between epochs (with num_workers > 0) instead of restarting them."""
    max_bad_fraction: float = 0.5
    """Stop when more than this fraction of one batch's draws are unreadable."""
    synthetic_size: int = 4096
    """Number of distinct synthetic clips per epoch."""
    synthetic_entering: bool = False
    """Synthetic objects enter from the edge they move away from at top speed (one trajectory per direction),
    instead of a random start and speed."""
    synthetic_entering_epochs: int = 0
    """A curriculum: objects enter from the edge in the first N passes over the synthetic_size clips (N * synthetic_size
    / batch size steps), then start at random positions and speeds (0 = synthetic_entering decides throughout)."""
    synthetic_size_scale: float = 1.0
    """Multiplies the synthetic object's size (half-size 15-22% of the resolution at 1): bigger objects show their
    shape in more pixels, which small frames need (docs/proof.md)."""


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = 1000
    """Training timesteps of the DDPM schedule."""
    schedule: str = "linear"
    """Beta schedule: linear | scaled_linear | squaredcos_cap_v2."""
    beta_start: float = 0.0001
    """First beta of the linear schedules (Latte: 0.0001)."""
    beta_end: float = 0.02
    """Last beta of the linear schedules (Latte: 0.02)."""
    rescale_zero_snr: bool = False
    """Rescale betas to zero terminal SNR (needs prediction=v_prediction)."""
    prediction: str = "epsilon"
    """What the model predicts: epsilon | v_prediction."""
    loss_weighting: str = "none"
    """Per-timestep loss weights: none | min_snr (gamma 5)."""
    high_noise_bias: float = 0.0
    """Probability that a training sample's timestep is drawn from the noisiest 30% instead of uniformly. Where the
    input is almost pure noise the model must produce layout and motion from the condition alone; uniform sampling
    spends too little there for small models to learn it (docs/proof.md)."""
    sampler: str = "ddim"
    """Sampler for validation videos: ddim | dpm (DPM-Solver++ multistep)."""
    sample_steps: int = 25
    """Denoising steps when sampling."""
    guidance_scale: float = 4.0
    """Classifier-free guidance scale when sampling (1 = no guidance)."""


@dataclass
class TrainConfig:
    max_steps: int = 300
    """Optimizer steps to train for."""
    batch_size: int = 8
    """Micro-batch size per process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step: the update equals one batch of batch_size * grad_accum."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    warmup_steps: int = 20
    """Linear LR warmup, in optimizer steps."""
    lr_schedule: str = "constant"
    """constant | cosine (after warmup)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this once per optimizer step (0 = off)."""
    ema_decay: float = 0.999
    """EMA decay per optimizer step (0 = no EMA: samples use the live weights)."""
    ema_warmup: bool = True
    """Use decay min(ema_decay, (1 + step) / (10 + step)) so early EMA follows the model."""
    ema_every: int = 1
    """Update the EMA every this many optimizer steps, with the decay raised to this power (same horizon, less work)."""
    ema_on_cpu: bool = False
    """Keep the EMA weights in host memory (frees one model's worth of GPU memory; each update copies the weights to
    the host and waits for them, so pair it with ema_every > 1). Not with dist.strategy=fsdp."""
    cfg_dropout: float = 0.1
    """Per-sample probability of replacing the caption (or class) by the null one, for classifier-free guidance."""
    precision: str = "fp32"
    """fp32 | bf16 | fp8-te | fp8-ao."""
    fp8_recipe: str = "default"
    """FP8 scaling recipe: default (delayed for TE, tensorwise for torchao) | delayed | current | mxfp8 | block (TE) |
    tensorwise | rowwise | rowwise_with_gw_hp (torchao; the last keeps the weight-gradient GEMM in bf16)."""
    fp8_emulate: bool = False
    """fp8-ao only: torchao's emulated float8 (Float8LinearConfig(emulate=True)), which runs on CPU. For numerics checks
    (docs/precision.md's loss parity): no speed-up, and it converts every linear the FP8 shape rule allows, ignoring
    the rule's pays-off threshold (there is no FP8 GEMM to pay for)."""
    fp8_linears: str = "rule"
    """Which block linears run in FP8: rule (the FP8 rule, docs/precision.md: divisible by 16 and a GEMM big enough
    for FP8 to pay for its casts) | shape (every block linear divisible by 16, paying off or not: numerics checks of
    real FP8 GEMMs on a small model, as the GPU suite's parity part does; emulation always converts by shape)."""
    checkpointing: str = "none"
    """Activation checkpointing: none | full | every-k | selective-mlp | selective-attention | auto (the planner
    picks per block what to recompute - nothing, the MLP, the attention or the whole block - so the plan fits
    train.memory_budget_gb with the least recompute FLOPs)."""
    checkpointing_every: int = 2
    """For checkpointing=every-k: checkpoint every k-th block."""
    memory_budget_gb: float = 0.0
    """GiB that checkpointing=auto plans to fit (0 = the GPU's memory; give a number to plan on a CPU)."""
    residual_dtype: str = "bf16"
    """dtype of the residual stream between blocks under bf16/fp8 precision: bf16 (default: half the bytes of every
    kept block input; tiny-t2v bf16 losses equal fp32's within seed noise, docs/memory.md) | fp32. fp32 precision
    always keeps an fp32 residual."""
    compile: bool = False
    """torch.compile each block."""
    seed: int = 0
    """Seeds model init, data order, noise and CFG dropout."""
    device: str = "auto"
    """auto (cuda when present) | cpu | cuda."""
    log_every: int = 10
    """Write a metrics.jsonl line every this many optimizer steps."""
    sample_every: int = 0
    """Write validation samples every this many steps (0 = only at the end)."""
    ckpt_every: int = 0
    """Write a checkpoint every this many steps (0 = only at the end)."""
    keep_last: int = 2
    """How many old checkpoints to keep next to the newest (>= 1: a damaged newest one always has a fallback)."""
    max_bad_steps: int = 5
    """Stop after this many optimizer steps in a row with a NaN/inf loss or gradient."""


@dataclass
class SampleConfig:
    captions: list[str] = field(default_factory=list)
    """Captions for validation samples (empty: the dataset's held-out captions)."""
    num_samples: int = 4
    """How many captions / classes to sample at each validation."""
    seed: int = 1234
    """Fixed seed for validation noise."""
    fps: int = 8
    """Frame rate of written videos."""
    quality_seeds: int = 0
    """Synthetic text-to-video only: at each validation, also sample every held-out caption with this many seeds and
    log colour / direction / shape accuracy (bench/quality.py) to metrics.jsonl (0 = off)."""


@dataclass
class LogConfig:
    tensorboard: bool = False
    """Also log to TensorBoard under <run>/tensorboard."""
    wandb: bool = False
    """Also log to Weights & Biases (offline when no API key is configured)."""
    wandb_project: str = "ristretto"
    """wandb project name."""


@dataclass
class ProfileConfig:
    steps: int = 0
    """Wrap this many steps (after 2 warm-up steps) in torch.profiler and write a trace (0 = off)."""


@dataclass
class DistConfig:
    strategy: str = "auto"
    """auto (none with one process, else ddp) | none | ddp | fsdp."""


@dataclass
class RunConfig:
    preset: str = "tiny-t2v"
    """The preset this config started from."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    log: LogConfig = field(default_factory=LogConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    dist: DistConfig = field(default_factory=DistConfig)


CHOICES = {
    "model.kind": ("t2v", "class"),
    "model.attention_backend": ("sdpa", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math", "fa4", "fa3", "fa2",
                                "xformers"),
    "model.kernels": ("torch", "triton"),
    "model.temporal_attention": ("attention_backend", "triton"),
    "model.patch_size": (1, 2, 4, 8),
    "model.freeze": ("none", "spatial"),
    "data.kind": ("synthetic", "captioned", "class_folders", "cached"),
    "diffusion.schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "diffusion.prediction": ("epsilon", "v_prediction"),
    "diffusion.loss_weighting": ("none", "min_snr"),
    "diffusion.sampler": ("ddim", "dpm"),
    "train.lr_schedule": ("constant", "cosine"),
    "train.precision": ("fp32", "bf16", "fp8-te", "fp8-ao"),
    "train.fp8_linears": ("rule", "shape"),
    "train.fp8_recipe": ("default", "delayed", "current", "mxfp8", "block", "tensorwise", "rowwise",
                         "rowwise_with_gw_hp"),
    "train.checkpointing": ("none", "full", "every-k", "selective-mlp", "selective-attention", "auto"),
    "train.residual_dtype": ("fp32", "bf16"),
    "train.device": ("auto", "cpu", "cuda"),
    "dist.strategy": ("auto", "none", "ddp", "fsdp"),
}

POSITIVE = ("model.hidden_size", "model.depth", "model.num_heads", "model.in_channels", "model.caption_channels",
            "model.caption_length", "data.frames", "data.resolution", "train.max_steps", "train.batch_size",
            "train.grad_accum", "train.log_every", "diffusion.num_train_timesteps", "diffusion.sample_steps",
            "data.frame_stride", "train.max_bad_steps", "train.checkpointing_every")


# ----------------------------------------------------------------------------------------------------------- presets

def small_model_recipe(config: RunConfig) -> RunConfig:
    """What makes tiny models learn in CPU minutes (measured in docs/proof.md): v-prediction on a zero-terminal-SNR
    cosine schedule with half the timesteps from the noisiest 30%, patch 4, a high learning rate, mild guidance. The
    model keeps Latte-1's structure (diffusers-exportable); the Latte presets keep Latte's epsilon / linear recipe."""
    config.model.patch_size = 4
    diffusion = config.diffusion
    diffusion.schedule, diffusion.rescale_zero_snr, diffusion.prediction = "squaredcos_cap_v2", True, "v_prediction"
    diffusion.high_noise_bias, diffusion.guidance_scale = 0.5, 1.5
    config.train.lr = 2e-3
    return config


def tiny_t2v() -> RunConfig:
    """The default: a ~0.3M-parameter text-to-video Latte on synthetic 8x32x32 clips (64 tokens per frame); 600 steps
    take about a minute on 2 CPU cores and draw the captions' colours."""
    config = small_model_recipe(RunConfig(preset="tiny-t2v"))
    config.train.max_steps = 600
    return config


def tiny_class() -> RunConfig:
    """Class-conditional tiny Latte on synthetic clips (class = colour)."""
    config = small_model_recipe(RunConfig(preset="tiny-class"))
    config.model.kind = "class"
    config.model.num_classes = 6  # the synthetic colours (engine/synthetic.NUM_CLASSES)
    config.train.max_steps = 600
    return config


def latte_class(preset: str, hidden: int, depth: int, heads: int) -> RunConfig:
    """Latte-S/B/L/XL/2 on UCF-101 latents: 16 frames of 256^2 (32x32x4 latents), adaLN-Zero, learned sigma."""
    config = RunConfig(preset=preset)
    model = config.model
    model.kind, model.num_classes, model.in_channels, model.learn_sigma = "class", 101, 4, True
    model.hidden_size, model.depth, model.num_heads, model.patch_size = hidden, depth, heads, 2
    model.vae = "stabilityai/sd-vae-ft-ema"
    config.data.kind, config.data.frames, config.data.resolution = "class_folders", 16, 256
    config.data.num_workers = 8  # decoding 16-frame clips on the host: several workers per GPU
    config.train.lr, config.train.batch_size, config.train.precision = 1e-4, 4, "bf16"
    config.train.max_steps, config.train.ema_decay, config.train.warmup_steps = 100_000, 0.9999, 0
    return config


def latte_t2v_512() -> RunConfig:
    """Latte-1 text-to-video: 28 layers (28 spatial + 28 temporal), 16 heads x 72, T5-XXL captions, 16x512^2."""
    config = RunConfig(preset="latte-t2v-512")
    model = config.model
    model.in_channels, model.learn_sigma, model.patch_size = 4, True, 2
    model.hidden_size, model.depth, model.num_heads = 1152, 28, 16
    model.caption_channels, model.caption_length = 4096, 120
    model.vae, model.text_encoder = "stabilityai/sd-vae-ft-ema", "google/t5-v1_1-xxl"
    config.data.kind, config.data.frames, config.data.resolution = "cached", 16, 512
    config.data.num_workers = 2  # reading cached shards is light, but keeps up without blocking the step
    config.train.lr, config.train.batch_size, config.train.precision = 1e-4, 1, "bf16"
    config.train.max_steps, config.train.ema_decay, config.train.warmup_steps = 100_000, 0.9999, 0
    config.diffusion.guidance_scale = 7.5
    return config


def synthetic_model_recipe(preset: str) -> RunConfig:
    """The recipe both synthetic presets share: the small-model recipe at width 64, depth 4, the pooled caption in
    adaLN and per block, batch 16, on 16x16 clips."""
    config = small_model_recipe(RunConfig(preset=preset))
    config.model.hidden_size, config.model.depth, config.model.num_heads = 64, 4, 4
    config.model.pooled_caption, config.model.caption_adaln = True, True  # the caption in adaLN, and per block
    config.data.resolution, config.train.batch_size = 16, 16
    return config


def synthetic_proof() -> RunConfig:
    """Learns the synthetic caption grammar on CPU with objects at random start positions (docs/proof.md): quick-t2v's
    model and task (4 frames of 16x16, objects 1.5x as big) with a curriculum: for the first 4 passes over the clips
    (1024 steps) objects enter from the edge they move away from, then start at random positions and speeds. 3000
    steps (~5 single-core CPU minutes) draw held-out caption combinations in the right colour and direction."""
    config = synthetic_model_recipe("synthetic-proof")
    config.data.frames, config.data.synthetic_size_scale = 4, 1.5
    config.data.synthetic_entering, config.data.synthetic_entering_epochs = False, 4
    config.train.max_steps, config.train.sample_every = 3000, 500
    config.sample.quality_seeds = 2  # held-out colour / direction / shape logged at each validation
    return config


def quick_t2v() -> RunConfig:
    """The default (`python train.py`): the synthetic recipe on 4 frames of 16x16 with objects 1.5x as big that enter
    from the edge they move away from, so that ~3 single-core CPU minutes draw held-out captions in the right colour,
    direction and (mostly) shape (score a run with `python -m ristretto.bench.quality --run DIR`; docs/proof.md). Its
    per-block caption modulation has no diffusers equivalent, so its export is in our format only; tiny-t2v is the
    plain, exportable Latte-1."""
    config = synthetic_model_recipe("quick-t2v")
    config.data.frames, config.data.synthetic_size_scale, config.data.synthetic_entering = 4, 1.5, True
    config.train.max_steps, config.train.sample_every = 2000, 0
    config.sample.quality_seeds = 0  # scoring is bench.quality's job: one metrics line per step for tools reading it
    return config


PRESETS = {
    "quick-t2v": quick_t2v,
    "tiny-t2v": tiny_t2v,
    "tiny-class": tiny_class,
    "latte-s2-ucf": lambda: latte_class("latte-s2-ucf", 384, 12, 6),
    "latte-b2-ucf": lambda: latte_class("latte-b2-ucf", 768, 12, 12),
    "latte-l2-ucf": lambda: latte_class("latte-l2-ucf", 1024, 24, 16),
    "latte-xl2-ucf": lambda: latte_class("latte-xl2-ucf", 1152, 14, 16),
    "latte-t2v-512": latte_t2v_512,
    "synthetic-proof": synthetic_proof,
}


def preset_config(name: str) -> RunConfig:
    """A fresh RunConfig from the preset called `name`."""
    if name not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    return PRESETS[name]()


# --------------------------------------------------------------------------------------------------------- overrides

def _field_types(obj) -> dict[str, typing.Any]:
    return typing.get_type_hints(type(obj))


def _parse_value(key: str, text: str, kind) -> typing.Any:
    """Parse `text` as the type `kind` of field `key`, or raise ConfigError naming the key."""
    origin = typing.get_origin(kind)
    if origin is list:
        (item_kind,) = typing.get_args(kind)
        items = json.loads(text) if text.strip().startswith("[") else [t for t in text.split(",") if t.strip()]
        return [_parse_value(key, str(item), item_kind) for item in items]
    if origin in (typing.Union, types.UnionType):
        return _parse_value(key, text, next(a for a in typing.get_args(kind) if a is not type(None)))
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true or false, got {text!r}")
    try:
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except ValueError:
        raise ConfigError(f"{key}: expected {kind.__name__}, got {text!r}") from None
    return text


def apply_override(config: RunConfig, assignment: str) -> None:
    """Apply one `section.field=value` assignment in place; unknown keys and bad values raise ConfigError."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value, e.g. train.lr=1e-4")
    key, text = assignment.split("=", 1)
    key = key.strip()
    *path, name = key.split(".")
    target = config
    for part in path:
        if not dataclasses.is_dataclass(target) or part not in _field_types(target):
            raise ConfigError(f"{key}: unknown key (sections: {', '.join(f.name for f in dataclasses.fields(config))})")
        target = getattr(target, part)
    types_here = _field_types(target) if dataclasses.is_dataclass(target) else {}
    if name not in types_here or dataclasses.is_dataclass(getattr(target, name)):
        known = ", ".join(f"{'.'.join(path)}.{n}" for n in types_here) if path else "a section.field"
        raise ConfigError(f"{key}: unknown key; expected one of {known}")
    setattr(target, name, _parse_value(key, text, types_here[name]))


def get_value(config: RunConfig, key: str):
    """The value at dotted `key`."""
    target = config
    for part in key.split("."):
        target = getattr(target, part)
    return target


def validate(config: RunConfig) -> RunConfig:
    """Check choices and cross-field rules; raise ConfigError naming the first bad key."""
    for key, choices in CHOICES.items():
        value = get_value(config, key)
        if value not in choices:
            raise ConfigError(f"{key}: got {value!r}; expected one of {', '.join(map(str, choices))}")
    for key in POSITIVE:
        if get_value(config, key) <= 0:
            raise ConfigError(f"{key}: must be positive, got {get_value(config, key)}")
    model, data, train = config.model, config.data, config.train
    if model.hidden_size % model.num_heads:
        raise ConfigError(f"model.hidden_size: {model.hidden_size} must be divisible by model.num_heads={model.num_heads}")
    if data.resolution % model.patch_size:
        raise ConfigError(f"data.resolution: {data.resolution} must be divisible by model.patch_size={model.patch_size}")
    if model.kind == "class" and model.num_classes <= 0:
        raise ConfigError("model.num_classes: must be positive for model.kind=class")
    if not 0.0 <= train.cfg_dropout < 1.0:
        raise ConfigError(f"train.cfg_dropout: expected a probability in [0, 1), got {train.cfg_dropout}")
    if not 0.0 <= train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay: expected a value in [0, 1), got {train.ema_decay}")
    if train.ema_every < 1:
        raise ConfigError(f"train.ema_every: must be >= 1, got {train.ema_every}")
    if train.ema_on_cpu and config.dist.strategy == "fsdp":
        raise ConfigError("train.ema_on_cpu: not with dist.strategy=fsdp (the EMA is sharded like the model there)")
    if config.diffusion.rescale_zero_snr and config.diffusion.prediction != "v_prediction":
        raise ConfigError("diffusion.rescale_zero_snr: needs diffusion.prediction=v_prediction (epsilon is undefined at zero SNR)")
    if config.sample.quality_seeds and (model.kind != "t2v" or data.kind != "synthetic"):
        raise ConfigError("sample.quality_seeds: the automatic score reads synthetic text-to-video samples; needs "
                          f"model.kind=t2v and data.kind=synthetic (got {model.kind}, {data.kind})")
    if train.precision == "fp8-te" and train.fp8_recipe in ("default", "delayed") and train.compile:
        raise ConfigError("train.compile: Transformer Engine's delayed-scaling FP8 recipe does not run under "
                          "torch.compile; use train.fp8_recipe=current, or train.compile=false")
    if train.fp8_emulate and train.precision != "fp8-ao":
        raise ConfigError(f"train.fp8_emulate: only torchao emulates float8; needs train.precision=fp8-ao, got "
                          f"{train.precision}")
    if train.fp8_linears != "rule" and not train.precision.startswith("fp8"):
        raise ConfigError(f"train.fp8_linears={train.fp8_linears}: chooses FP8 linears; needs train.precision=fp8-te "
                          f"or fp8-ao, got {train.precision}")
    if train.precision == "fp8-ao" and not train.compile and not train.fp8_emulate:
        # torchao's float8 training is built on torch.compile, which fuses its amax and cast passes; eagerly they are
        # separate memory passes the FP8 GEMM does not repay (torchao docs; docs/precision.md).
        raise ConfigError("train.precision=fp8-ao needs train.compile=true: eager torchao float8 is slower than bf16 "
                          "(its amax and cast kernels only fuse under torch.compile); set train.compile=true or "
                          "train.precision=bf16")
    if not 0.0 <= config.diffusion.high_noise_bias <= 1.0:
        raise ConfigError(f"diffusion.high_noise_bias: expected a probability in [0, 1], got "
                          f"{config.diffusion.high_noise_bias}")
    if data.prefetch_factor < 1:
        raise ConfigError(f"data.prefetch_factor: must be >= 1, got {data.prefetch_factor}")
    if train.memory_budget_gb < 0:
        raise ConfigError(f"train.memory_budget_gb: must be >= 0 (0 = the GPU's memory), got {train.memory_budget_gb}")
    if model.freeze != "none" and not (model.init or model.init_spatial):
        raise ConfigError(f"model.freeze={model.freeze}: needs model.init or model.init_spatial (frozen random weights, "
                          f"with the final layer starting at zero, would leave nothing to learn)")
    if not 0.0 < data.synthetic_size_scale <= 2.0:
        raise ConfigError(f"data.synthetic_size_scale: expected a factor in (0, 2] (2 makes the largest object 88% "
                          f"of the frame), got {data.synthetic_size_scale}")
    if data.num_images < 0:
        raise ConfigError(f"data.num_images: must be >= 0, got {data.num_images}")
    if model.temporal_attention == "triton" and data.frames > 64:  # kernels/temporal_attention.MAX_FRAMES
        raise ConfigError(f"model.temporal_attention: the Triton kernel attends over at most 64 frames, got "
                          f"data.frames={data.frames}; use model.temporal_attention=attention_backend")
    validate_numbers(config)
    return config


# Fields that must be >= 0 (0 meaning "off" or "none" where the docstring says so).
NON_NEGATIVE = ("train.weight_decay", "train.grad_clip", "train.warmup_steps", "train.sample_every",
                "train.ckpt_every", "data.num_workers", "sample.quality_seeds", "profile.steps")
# Fields that must be > 0, beyond the integer sizes of POSITIVE.
POSITIVE_NUMBERS = ("train.lr", "model.mlp_ratio", "model.norm_eps", "model.vae_scaling_factor", "sample.num_samples",
                    "sample.fps", "train.keep_last")


def float_fields(obj, prefix: str = ""):
    """(dotted key, value) of every float (and list-of-float item) in the config tree."""
    for item in dataclasses.fields(obj):
        value, key = getattr(obj, item.name), f"{prefix}{item.name}"
        if dataclasses.is_dataclass(value):
            yield from float_fields(value, f"{key}.")
        elif isinstance(value, float):
            yield key, value
        elif isinstance(value, list):
            yield from ((f"{key}[{i}]", v) for i, v in enumerate(value) if isinstance(v, float))


def validate_numbers(config: RunConfig) -> None:
    """Finite numbers everywhere, and the optimizer, sampler and checkpoint values in range: found here, before a
    run starts, instead of as NaN weights, black samples or a crash after training steps."""
    for key, value in float_fields(config):
        if not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value}")
    for key in NON_NEGATIVE:
        if get_value(config, key) < 0:
            raise ConfigError(f"{key}: must be >= 0, got {get_value(config, key)}")
    for key in POSITIVE_NUMBERS:
        if get_value(config, key) <= 0:
            raise ConfigError(f"{key}: must be positive, got {get_value(config, key)}")
    train, diffusion = config.train, config.diffusion
    if len(train.betas) != 2 or not all(0.0 <= beta < 1.0 for beta in train.betas):
        raise ConfigError(f"train.betas: expected two values in [0, 1) (AdamW's beta1, beta2), got {train.betas}")
    if diffusion.sample_steps > diffusion.num_train_timesteps:
        raise ConfigError(f"diffusion.sample_steps: {diffusion.sample_steps} is more than the schedule's "
                          f"diffusion.num_train_timesteps={diffusion.num_train_timesteps}")
    if not 0.0 < diffusion.beta_start < diffusion.beta_end < 1.0:
        raise ConfigError(f"diffusion.beta_start, beta_end: expected 0 < beta_start < beta_end < 1, got "
                          f"{diffusion.beta_start}, {diffusion.beta_end}")
    if not 0.0 <= config.data.max_bad_fraction <= 1.0:
        raise ConfigError(f"data.max_bad_fraction: expected a fraction in [0, 1], got {config.data.max_bad_fraction}")


DEFAULT_PRESET = "quick-t2v"
"""What `python train.py` trains without --preset."""


def build_config(preset: str = DEFAULT_PRESET, overrides: list[str] | None = None) -> RunConfig:
    """Preset + overrides, validated."""
    config = preset_config(preset)
    for assignment in overrides or []:
        apply_override(config, assignment)
    if config.model.init or config.model.init_spatial:
        from .pretrained import adopt_pretrained_fields  # noqa: PLC0415

        adopt_pretrained_fields(config, {a.split("=", 1)[0].strip() for a in overrides or []})
    return validate(config)


def config_to_dict(config: RunConfig) -> dict:
    return dataclasses.asdict(config)


RESUMES_KEY = "resumes"  # config.json's history of resumes and what each changed (engine/train.write_run_config)


def config_from_dict(values: dict) -> RunConfig:
    """Rebuild a RunConfig from `config_to_dict` output (e.g. a run's config.json); unknown keys raise ConfigError."""
    config = RunConfig()
    for section, fields in values.items():
        if section == RESUMES_KEY:
            continue
        if not isinstance(fields, dict):
            apply_override(config, f"{section}={fields}") if section != "preset" else setattr(config, "preset", fields)
            continue
        for name, value in fields.items():
            text = json.dumps(value) if isinstance(value, list) else str(value)
            apply_override(config, f"{section}.{name}={text}")
    return validate(config)
