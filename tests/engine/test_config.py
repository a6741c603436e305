"""Config: presets build, overrides are type-checked, unknown keys and bad values are named in one line."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ristretto.engine.config import (PRESETS, ConfigError, build_config, config_from_dict, config_to_dict)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_validates_and_round_trips(preset):
    config = build_config(preset)
    assert config.preset == preset
    assert config_from_dict(json.loads(json.dumps(config_to_dict(config)))) == config


def test_overrides_are_parsed_by_field_type():
    config = build_config("tiny-t2v", ["train.lr=3e-4", "model.depth=3", "train.compile=true",
                                       "train.betas=0.8,0.95", "sample.captions=[\"a red circle moving up\"]"])
    assert config.train.lr == 3e-4 and config.model.depth == 3 and config.train.compile is True
    assert config.train.betas == [0.8, 0.95] and config.sample.captions == ["a red circle moving up"]


@pytest.mark.parametrize("assignment, message", [
    ("train.lrr=1", "train.lrr: unknown key"),
    ("nope.lr=1", "nope.lr: unknown key"),
    ("train.lr=fast", "train.lr: expected float"),
    ("model.depth=2.5", "model.depth: expected int"),
    ("train.compile=maybe", "train.compile: expected true or false"),
    ("model.kind=video", "model.kind: got 'video'"),
    ("train.batch_size=0", "train.batch_size: must be positive"),
    ("model.hidden_size=30", "model.hidden_size: 30 must be divisible by model.num_heads"),
    ("data.resolution=30", "data.resolution: 30 must be divisible by model.patch_size"),
    ("train.cfg_dropout=1.5", "train.cfg_dropout"),
    ("train.lr", "expected key=value"),
    ("sample.quality_seeds=2", None),  # fine on the default synthetic t2v preset
])
def test_bad_overrides_name_the_key(assignment, message):
    if message is None:
        build_config("tiny-t2v", [assignment])
        return
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        build_config("tiny-t2v", [assignment])


@pytest.mark.parametrize("preset, assignments, message", [
    ("tiny-class", ["sample.quality_seeds=2"], "sample.quality_seeds: the automatic score"),
    ("tiny-t2v", ["train.precision=fp8-te", "train.compile=true"], "train.compile: Transformer Engine"),
])
def test_cross_field_rules_name_the_field(preset, assignments, message):
    with pytest.raises(ConfigError, match=message):
        build_config(preset, assignments)


def test_unknown_preset_is_named():
    with pytest.raises(ConfigError, match="--preset: unknown preset 'latte-xxl'"):
        build_config("latte-xxl")


@pytest.mark.parametrize("args, message", [
    (["--set", "train.lrr=1"], "train.lrr: unknown key"),
    (["--preset", "nope"], "unknown preset 'nope'"),
])
def test_cli_user_errors_are_one_line_and_nonzero(args, message, tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *args, "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "config.json").exists()


def test_default_preset_is_the_quick_caption_learner_and_size_scale_is_checked():
    from ristretto.engine.cli import parse_args
    from ristretto.engine.config import DEFAULT_PRESET

    assert parse_args([]).preset is None and DEFAULT_PRESET == "quick-t2v"
    config = build_config()
    assert config.preset == "quick-t2v" and config.data.synthetic_entering and config.model.caption_adaln
    with pytest.raises(ConfigError, match="data.synthetic_size_scale"):
        build_config("quick-t2v", ["data.synthetic_size_scale=3"])
