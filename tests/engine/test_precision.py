"""Precision converters: which linears go to FP8, autocast behaviour, error messages, plain checkpoints."""
import contextlib
import sys
import types

import pytest
import torch
from torch import nn

from ristretto.engine import precision as prec
from ristretto.engine.precision import apply_precision, fp8_linear_filter, load_plain_state_dict, plain_state_dict

from . import fake_te as fake_te_module
from .fake_te import Linear as FakeTELinear

DIM = 64


class ToyBlock(nn.Module):
    """Shaped like a Latte block: attention and MLP linears (FP8), an odd 72-wide pair, a tiny one, adaLN."""

    def __init__(self):
        super().__init__()
        self.adaLN_modulation = nn.Linear(DIM, 2 * DIM)                                # per-sample GEMM: stays
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)   # FP8
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(DIM, 4 * DIM), nn.Linear(4 * DIM, DIM)  # FP8
        self.odd_in, self.odd_out = nn.Linear(DIM, 72), nn.Linear(72, DIM)             # 72 % 16 != 0: stays
        self.tiny = nn.Linear(DIM, 24, bias=False)                                     # 24 % 16 != 0: stays

    def forward(self, x, c):                                                 # x (B, S, D), c (B, D)
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)   # (B, 1, D) each
        h = x * (1 + scale) + shift
        q, k, v = self.attn.qkv(h).chunk(3, dim=-1)
        x = x + self.attn.proj(torch.softmax(q @ k.transpose(1, 2) / DIM ** 0.5, dim=-1) @ v)
        x = x + self.mlp.fc2(nn.functional.gelu(self.mlp.fc1(x)))
        return x + self.odd_out(self.odd_in(x)) + self.tiny(x).sum(-1, keepdim=True)


class ToyModel(nn.Module):
    def __init__(self, depth=2):
        super().__init__()
        self.x_embedder = nn.Linear(16, DIM)
        self.t_embedder = nn.Sequential(nn.Linear(DIM, DIM), nn.SiLU(), nn.Linear(DIM, DIM))
        self.blocks = nn.ModuleList(ToyBlock() for _ in range(depth))
        self.proj_out = nn.Linear(DIM, DIM)

    def forward(self, x, t):                                                 # x (B, S, 16), t (B, D)
        x, c = self.x_embedder(x), self.t_embedder(t)
        for block in self.blocks:
            x = block(x, c)
        return self.proj_out(x)


FP8_NAMES = [f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]


def toy_model(seed=0):
    torch.manual_seed(seed)
    return ToyModel()


def toy_batch(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(4, 16, 16, generator=gen), torch.randn(4, DIM, generator=gen)


@pytest.fixture
def any_device_fp8(monkeypatch):
    """Lets FP8 conversion run on CPU: the capability check is what stands between a CPU and FP8."""
    monkeypatch.setattr(prec, "check_fp8_device", lambda device, precision, recipe: None)


# ---- Transformer Engine stand-in (tests/engine/fake_te.py) ----

@pytest.fixture
def fake_te(monkeypatch):
    return fake_te_module.install(monkeypatch)


# ---- the filter ----

def test_filter_picks_only_block_linears_with_fp8_shapes():
    assert prec.fp8_linear_names(toy_model()) == FP8_NAMES


LATTE1_ROWS = 16 * 1024  # Latte-1 at 512^2: 16 frames x 32x32 tokens per sample, batch 1


@pytest.mark.parametrize("name, module, rows, expected", [
    ("blocks.3.attn.qkv", nn.Linear(1152, 3456), LATTE1_ROWS, True),
    ("blocks.3.attn.proj", nn.Linear(1152, 1152), LATTE1_ROWS, True),     # intensity 556
    ("blocks.3.mlp.fc2", nn.Linear(4608, 1152), LATTE1_ROWS, True),
    ("blocks.3.cross_attn.kv", nn.Linear(1152, 2304), 120, False),        # 120 caption rows: intensity 103
    ("blocks.3.attn.proj", nn.Linear(1152, 1152), 256, False),            # few rows: memory-bound
    ("blocks.3.mlp.fc1", nn.Linear(64, 256), 2048, False),                # a 64-wide model: intensity < 64
    ("blocks.3.mlp.fc1", nn.Linear(64, 256), None, True),                 # rows unknown: the shape part only
    ("blocks.3.attn.qkv", nn.Linear(72, 64), None, False),                # not divisible by 16
    ("blocks.3.attn.qkv", nn.Linear(1160, 3456), LATTE1_ROWS, False),     # 1160 % 16 != 0
    ("blocks.3.adaLN_modulation.1", nn.Linear(1152, 6912), LATTE1_ROWS, False),
    ("proj_out", nn.Linear(1152, 1152), LATTE1_ROWS, False),               # final projection
    ("t_embedder.mlp.0", nn.Linear(256, 1152), LATTE1_ROWS, False),        # timestep MLP
    ("caption_projection.linear_1", nn.Linear(4096, 1152), LATTE1_ROWS, False),
    ("blocks.3.norm1", nn.LayerNorm(1152), LATTE1_ROWS, False),
])
def test_filter_rules(name, module, rows, expected):
    assert fp8_linear_filter(name, module, rows) is expected


def test_gemm_rows_of_caption_linears():
    rows = prec.gemm_rows(batch_size=2, tokens_per_sample=1000, caption_length=120)
    assert rows("blocks.0.cross_attn.kv") == 240 and rows("blocks.0.cross_attn.q") == 2000
    assert rows("blocks.1.mlp.fc1") == 2000


def test_latte1_plan_of_the_rule():
    """On Latte-1 every block linear but cross-attention K/V goes to FP8; on the 64-wide proof model none does."""
    from ristretto.engine.build import build_plain_model, fp8_gemm_rows
    from ristretto.engine.config import build_config

    config = build_config("latte-t2v-512", ["model.depth=1", "model.vae=identity", "model.in_channels=4",
                                            "data.resolution=64", "model.patch_size=2"])  # 32x32 tokens, no VAE
    model = build_plain_model(config)
    chosen = prec.fp8_linear_names(model, fp8_gemm_rows(config))
    eligible = prec.fp8_linear_names(model)
    assert sorted(set(eligible) - set(chosen)) == ["blocks.0.cross_attn.kv"]
    proof = build_config("synthetic-proof")
    assert prec.fp8_linear_names(build_plain_model(proof), fp8_gemm_rows(proof)) == []


@pytest.mark.parametrize("preset", ["tiny-t2v", "tiny-class"])
def test_filter_on_the_latte_model(preset):
    from ristretto.engine.config import PRESETS
    from ristretto.model.latte import latte_from_config

    model = latte_from_config(PRESETS[preset]().model, frames=2, sample_size=8)
    names = prec.fp8_linear_names(model)
    assert names and all(name.startswith("blocks.") and "modulation" not in name for name in names)
    assert {"blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"} <= set(names)


# ---- fp32 / bf16 ----

def test_fp32_is_a_null_context():
    model = toy_model()
    precision = apply_precision(model, "fp32")
    assert precision.converted == [] and isinstance(precision.autocast(), contextlib.nullcontext)
    with precision.autocast():
        assert model(*toy_batch()).dtype == torch.float32


def test_bf16_autocasts_the_forward_and_keeps_fp32_weights():
    model = toy_model()
    precision = apply_precision(model, "bf16", "default")
    assert (precision.name, precision.device_type, precision.converted) == ("bf16", "cpu", [])
    with precision.autocast():
        out = model(*toy_batch())
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    assert not torch.is_autocast_enabled("cpu")  # the context closes


# ---- errors: one line naming the field and the choices ----

@pytest.mark.parametrize("precision, recipe, pattern", [
    ("fp16", "default", r"^train.precision: unknown precision 'fp16'; expected one of \('fp32', 'bf16', 'fp8-te'"),
    ("fp8-te", "hybrid", r"^train.fp8_recipe: unknown recipe 'hybrid'; expected one of \('default', 'delayed'"),
    ("fp8-ao", "delayed", r"^train.fp8_recipe: 'delayed' is not a recipe of train.precision='fp8-ao'; "
                          r"expected one of \('default', 'tensorwise', 'rowwise', 'rowwise_with_gw_hp'\)"),
    ("fp8-te", "rowwise", r"^train.fp8_recipe: 'rowwise' is not a recipe of train.precision='fp8-te'"),
])
def test_bad_names_are_one_line(precision, recipe, pattern):
    with pytest.raises(ValueError, match=pattern) as error:
        apply_precision(toy_model(), precision, recipe)
    assert "\n" not in str(error.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
@pytest.mark.parametrize("precision", ["fp8-te", "fp8-ao"])
def test_fp8_without_gpu_names_bf16(precision):
    with pytest.raises(RuntimeError, match=r"FP8 needs an Ada/Hopper GPU \(sm_89\+\), found no CUDA device.*"
                                           r"use train.precision='bf16'"):
        apply_precision(toy_model(), precision)


@pytest.mark.parametrize("capability, recipe, pattern", [
    ((8, 6), "delayed", r"FP8 needs an Ada/Hopper GPU \(sm_89\+\), found sm_86; use train.precision='bf16'"),
    ((8, 9), "block", r"train.fp8_recipe='block' needs a Hopper \(sm_90\) GPU, found sm_89"),
    ((9, 0), "mxfp8", r"train.fp8_recipe='mxfp8' needs a Blackwell \(sm_100\) GPU, found sm_90"),
])
def test_gpu_capability_checks(monkeypatch, capability, recipe, pattern):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    with pytest.raises(RuntimeError, match=pattern):
        prec.check_fp8_device(torch.device("cuda"), "fp8-te", recipe)


def test_capable_gpu_passes(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    for recipe in ("delayed", "current", "block", "tensorwise", "rowwise"):
        prec.check_fp8_device(torch.device("cuda"), "fp8-te", recipe)


@pytest.mark.parametrize("precision, module, install", [
    ("fp8-te", "transformer_engine.pytorch", "pip install transformer-engine\\[pytorch\\]"),
    ("fp8-ao", "torchao.float8", "pip install torchao"),
])
def test_missing_backend_names_the_package(monkeypatch, any_device_fp8, precision, module, install):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=f"^train.precision='{precision}' needs {module}: {install}$") as error:
        apply_precision(toy_model(), precision)
    assert error.value.__suppress_context__


# ---- fp8-te (fake TE on CPU) ----

@pytest.mark.parametrize("recipe, recipe_class", [("default", "DelayedScaling"), ("current", "Float8CurrentScaling"),
                                                  ("block", "Float8BlockScaling"), ("mxfp8", "MXFP8BlockScaling")])
def test_fp8_te_swaps_chosen_linears_and_wraps_forward(fake_te, any_device_fp8, caplog, recipe, recipe_class):
    model, reference = toy_model(), toy_model()
    with caplog.at_level("INFO", logger=prec.__name__):
        precision = apply_precision(model, "fp8-te", recipe)
    assert precision.converted == FP8_NAMES and "8 linears in FP8: blocks.0.attn.qkv" in caplog.text
    swapped = [name for name, m in model.named_modules() if isinstance(m, FakeTELinear)]
    assert swapped == FP8_NAMES
    with precision.autocast():
        out = model(*toy_batch())
        assert torch.is_autocast_enabled("cpu")
    assert [(enabled, type(r).__name__, group) for enabled, r, group in fake_te.STATE.entered] == \
        [(True, recipe_class, None)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference(*toy_batch())
    # the same weights, so the bf16 forward up to FP8 rounding (e4m3: 3 mantissa bits)
    assert (out.float() - expected.float()).abs().mean() < 0.1 * expected.float().abs().mean()


# ---- checkpoints across precisions ----

def assert_same_state(state, expected):
    assert list(state) == list(expected)
    for key in expected:
        assert type(state[key]) is torch.Tensor, key
        torch.testing.assert_close(state[key], expected[key], rtol=0, atol=0, msg=key)


def converted_model(kind, seed):
    model = toy_model(seed)
    if kind != "plain":
        apply_precision(model, kind)
    return model


@pytest.mark.parametrize("source", ["plain", "fp8-te", "fp8-ao"])
@pytest.mark.parametrize("target", ["plain", "fp8-te", "fp8-ao"])
def test_checkpoint_round_trip_across_precisions(fake_te, any_device_fp8, source, target):
    if "fp8-ao" in (source, target):
        pytest.importorskip("torchao.float8")
    saved = plain_state_dict(converted_model(source, seed=0))
    assert_same_state(saved, toy_model(0).state_dict())
    assert not any(key.endswith("_extra_state") for key in saved)
    model = converted_model(target, seed=123)
    load_plain_state_dict(model, saved)
    assert_same_state(plain_state_dict(model), saved)


def test_newer_te_autocast_is_preferred(monkeypatch, any_device_fp8):
    te = fake_te_module.install(monkeypatch, with_new_autocast=True)  # te.autocast(recipe=, amax_reduction_group=)
    calls = []
    te.fp8_autocast = lambda **kwargs: calls.append(kwargs)  # deprecated in newer TE: must not be called
    precision = apply_precision(toy_model(), "fp8-te", "current")
    precision.fp8_group = "the group"
    with precision.autocast():
        pass
    assert [(enabled, type(r).__name__, group) for enabled, r, group in te.STATE.entered] == \
        [(True, "Float8CurrentScaling", "the group")] and calls == []


def test_raw_te_state_dict_loads_into_plain_model(fake_te, any_device_fp8):
    raw = converted_model("fp8-te", seed=0).state_dict()
    assert any(key.endswith("._extra_state") for key in raw)  # why plain_state_dict exists
    model = toy_model(5)
    load_plain_state_dict(model, raw)
    assert_same_state(model.state_dict(), toy_model(0).state_dict())


def test_mismatched_checkpoint_is_an_error():
    state = toy_model().state_dict()
    state.pop("proj_out.bias")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"missing \['proj_out.bias'\], unexpected \['extra.weight'\]"):
        load_plain_state_dict(toy_model(), state)


# ---- training: FP8 loss tracks bf16 ----

def train_losses(precision_name, recipe="default", device="cpu", steps=6):
    model = toy_model(0).to(device)
    precision = apply_precision(model, precision_name, recipe)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, t = (tensor.to(device) for tensor in toy_batch())
    target = torch.randn(4, 16, DIM, generator=torch.Generator().manual_seed(2)).to(device)
    losses = []
    for _ in range(steps):
        with precision.autocast():
            out = model(x, t)
        loss = (out.float() - target).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def assert_tracks_bf16(losses, bf16_losses, rtol=0.05):
    assert losses[-1] < losses[0], losses
    for step, (a, b) in enumerate(zip(losses, bf16_losses)):
        assert abs(a - b) <= rtol * b, f"step {step}: fp8 {a:.4f} vs bf16 {b:.4f}"


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "rowwise_with_gw_hp"])
def test_fp8_ao_training_tracks_bf16_on_cpu(any_device_fp8, recipe):
    pytest.importorskip("torchao.float8")
    assert_tracks_bf16(train_losses("fp8-ao", recipe), train_losses("bf16"))


@pytest.mark.gpu
@pytest.mark.parametrize("precision_name, recipe", [("fp8-te", "delayed"), ("fp8-te", "current"),
                                                    ("fp8-te", "block"), ("fp8-te", "mxfp8"),
                                                    ("fp8-ao", "tensorwise"), ("fp8-ao", "rowwise"),
                                                    ("fp8-ao", "rowwise_with_gw_hp")])
def test_gpu_fp8_training_tracks_bf16(precision_name, recipe):
    pytest.importorskip("transformer_engine.pytorch" if precision_name == "fp8-te" else "torchao.float8")
    needed = prec.RECIPE_MIN_CAPABILITY.get(recipe, (prec.FP8_MIN_CAPABILITY, ""))[0]
    if torch.cuda.get_device_capability() < needed:
        pytest.skip(f"{recipe} needs sm_{needed[0]}{needed[1]}")
    assert_tracks_bf16(train_losses(precision_name, recipe, "cuda"), train_losses("bf16", device="cuda"))


# ---- fp8-ao: compile or emulation; recipes ----

@pytest.mark.parametrize("overrides, pattern", [
    (["train.precision=fp8-ao"], r"^train.precision=fp8-ao needs train.compile=true: eager torchao float8 is slower"),
    (["train.precision=bf16", "train.fp8_emulate=true"], r"^train.fp8_emulate: only torchao emulates float8; needs "
                                                         r"train.precision=fp8-ao, got bf16$"),
])
def test_fp8_config_errors_name_the_fields(overrides, pattern):
    from ristretto.engine.config import ConfigError, build_config

    with pytest.raises(ConfigError, match=pattern):
        build_config("tiny-t2v", overrides)


def test_fp8_ao_with_compile_or_emulation_is_valid():
    from ristretto.engine.config import build_config

    build_config("tiny-t2v", ["train.precision=fp8-ao", "train.compile=true"])
    build_config("tiny-t2v", ["train.precision=fp8-ao", "train.fp8_emulate=true"])


@pytest.mark.parametrize("recipe, granularity", [("tensorwise", "TENSORWISE"), ("rowwise", "AXISWISE"),
                                                  ("rowwise_with_gw_hp", "AXISWISE")])
def test_fp8_ao_emulated_runs_on_cpu_with_its_recipe(recipe, granularity):
    pytest.importorskip("torchao.float8")
    from torchao.float8.float8_linear import Float8Linear

    model = toy_model()
    precision = apply_precision(model, "fp8-ao", recipe, emulate=True)  # no capability check: emulation
    linears = [m for m in model.modules() if isinstance(m, Float8Linear)]
    assert precision.converted == FP8_NAMES and len(linears) == len(FP8_NAMES)
    assert all(m.config.emulate and m.config.cast_config_input.scaling_granularity.name == granularity
               for m in linears)
    with precision.autocast():
        model(*toy_batch()).float().square().mean().backward()


def test_emulation_ignores_the_pays_off_part_but_not_the_shape_part():
    pytest.importorskip("torchao.float8")
    rows = prec.gemm_rows(batch_size=1, tokens_per_sample=16, caption_length=4)  # far below the threshold
    assert apply_precision(toy_model(), "fp8-ao", "tensorwise", emulate=True, rows=rows).converted == FP8_NAMES


def test_rule_keeps_small_gemms_in_bf16(fake_te, any_device_fp8, caplog):
    rows = prec.gemm_rows(batch_size=1, tokens_per_sample=16, caption_length=4)
    with caplog.at_level("INFO", logger=prec.__name__):
        precision = apply_precision(toy_model(), "fp8-te", "delayed", rows=rows)
    assert precision.converted == [] and precision.skipped == FP8_NAMES
    assert "0 linears in FP8; 8 kept in bf16" in caplog.text and "FP8 rule:" in caplog.text


# ---- the planner shows the rule and counts TE's copies ----

def test_planner_shows_the_fp8_rule_and_counts_te_copies():
    from ristretto.engine.config import build_config
    from ristretto.engine.plan import predict_memory

    latte1 = ["model.depth=2"]
    bf16 = predict_memory(build_config("latte-t2v-512", latte1 + ["train.precision=bf16"]))
    fp8 = predict_memory(build_config("latte-t2v-512", latte1 + ["train.precision=fp8-te"]))
    assert "block linears in FP8 (FP8 rule:" in fp8.format() and "FP8 rule" not in bf16.format()
    spatial_bf16, spatial_fp8 = bf16.block_parts["spatial"], fp8.block_parts["spatial"]
    tokens, d, m = 16 * 1024, 1152, 4608
    assert spatial_fp8["attention"] - spatial_bf16["attention"] == tokens * d  # qkv's input: 1 FP8 byte (bf16: none)
    # FP8 weights: row-wise + transposed FP8 = one bf16 copy each; the bf16 attention and MLP branches are fused ops,
    # which keep no weight copies (cross-attention's linears keep autocast's copies in both)
    assert spatial_fp8["weight copies"] - spatial_bf16["weight copies"] == 2 * 4 * d * d + 2 * 2 * d * m
    tiny = predict_memory(build_config("synthetic-proof", ["train.precision=fp8-te"]))
    assert "block linears stay bf16" in tiny.format()
    assert tiny.peak_bytes == predict_memory(build_config("synthetic-proof", ["train.precision=bf16"])).peak_bytes
    emulated = predict_memory(build_config("synthetic-proof", ["train.precision=fp8-ao", "train.fp8_emulate=true",
                                                               "train.compile=true"]))
    assert "block linears in FP8 (emulated: every block linear (not adaLN)" in emulated.format()
    assert emulated.peak_bytes > tiny.peak_bytes  # converted linears run as modules, not the fused bf16 branches


def test_emulated_fp8_passes_the_preflight_on_cpu():
    from ristretto.engine.config import ConfigError, build_config
    from ristretto.engine.preflight import check_environment

    check_environment(build_config("tiny-t2v", ["train.precision=fp8-ao", "train.fp8_emulate=true"]),
                      torch.device("cpu"))
    with pytest.raises(ConfigError, match="FP8 training needs an Ada/Hopper"):
        check_environment(build_config("tiny-t2v", ["train.precision=fp8-ao", "train.compile=true"]),
                          torch.device("cpu"))


# ---- train.fp8_linears: the rule, or every shape-legal block linear (numerics checks of real FP8 GEMMs) ----

def test_fp8_linears_shape_converts_what_the_rule_keeps_in_bf16(monkeypatch):
    from ristretto.engine.build import build_training_model
    from ristretto.engine.config import build_config
    from ristretto.engine.plan import predict_memory

    monkeypatch.setattr(prec, "check_fp8_device", lambda device, precision, recipe: None)  # the stand-in runs on CPU
    fake_te_module.install(monkeypatch)
    converted = {}
    for choice in ("rule", "shape"):
        config = build_config("synthetic-proof", ["train.precision=fp8-te", f"train.fp8_linears={choice}"])
        model, _, precision = build_training_model(config, torch.device("cpu"))
        converted[choice] = precision.converted
        assert len(precision.converted) == sum(isinstance(m, FakeTELinear) for m in model.modules())
        assert not any("modulation" in name for name in precision.converted)  # adaLN stays out either way
    assert converted["rule"] == [] and len(converted["shape"]) == 44  # 64 wide: every GEMM below the threshold
    shape = predict_memory(build_config("synthetic-proof", ["train.precision=fp8-te", "train.fp8_linears=shape"]))
    assert "block linears in FP8 (train.fp8_linears=shape" in shape.format()


def test_fp8_linears_needs_an_fp8_precision_and_a_known_choice():
    from ristretto.engine.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="train.fp8_linears=shape: .*needs train.precision=fp8-te or fp8-ao"):
        build_config("synthetic-proof", ["train.precision=bf16", "train.fp8_linears=shape"])
    with pytest.raises(ConfigError, match="train.fp8_linears"):
        build_config("synthetic-proof", ["train.precision=fp8-te", "train.fp8_linears=all"])
