"""Export: a run's EMA weights in our format and, for t2v, a LattePipeline folder whose transformer/
LatteTransformer3DModel.from_pretrained loads with no missing keys and gives our model's output (plus zero sigma
channels), with the run's scheduler, the step and the config recorded; an older checkpoint never overwrites a newer
export unless forced. The end-to-end run through diffusers' LattePipeline is tests/engine/test_latte_pipeline.py."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ristretto.engine.build import build_plain_model, build_training_model
from ristretto.engine.config import build_config, config_from_dict
from ristretto.engine.export import ExportError, export_run, main
from ristretto.engine.train import train
from ristretto.model.diffusers_interop import to_diffusers

diffusers = pytest.importorskip("diffusers")

TINY = ["model.hidden_size=32", "model.num_heads=2", "model.depth=1", "data.frames=2", "data.resolution=8",
        "train.batch_size=2", "train.max_steps=2", "train.warmup_steps=1", "train.lr=1e-2", "train.ema_decay=0.5",
        "diffusion.sample_steps=1", "sample.num_samples=1"]


@pytest.fixture(scope="module")
def t2v_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("export") / "run"
    train(build_config("tiny-t2v", TINY), run_dir)
    return run_dir


def test_export_writes_ema_weights_and_a_diffusers_folder(t2v_run, capsys):
    assert main(["--run", str(t2v_run)]) == 0
    printed = capsys.readouterr().out.split()
    ours_dir, diffusers_dir = t2v_run / "export" / "ristretto", t2v_run / "export" / "diffusers"
    assert printed == [str(ours_dir), str(diffusers_dir)]
    ema = load_file(str(t2v_run / "weights" / "ema.safetensors"))
    live = load_file(str(t2v_run / "weights" / "model.safetensors"))
    exported = load_file(str(ours_dir / "model.safetensors"))
    assert all(torch.equal(exported[k], ema[k]) for k in ema) and exported.keys() == ema.keys()
    assert any(not torch.equal(ema[k], live[k]) for k in ema)  # really the EMA, not the live weights
    config = config_from_dict(json.loads((ours_dir / "config.json").read_text()))
    assert config.model.hidden_size == 32

    reference, info = diffusers.LatteTransformer3DModel.from_pretrained(str(diffusers_dir / "transformer"),
                                                                        output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    expected_state = to_diffusers(ema)
    loaded = reference.state_dict()
    assert all(torch.equal(loaded[k], expected_state[k]) for k in expected_state if not k.startswith("proj_out"))
    assert reference.config.out_channels == 6  # zero sigma channels: LattePipeline keeps the first half

    ours = build_plain_model(config).eval()
    ours.load_state_dict(exported)
    generator = torch.Generator().manual_seed(0)
    video = torch.randn(2, 2, 3, 8, 8, generator=generator)
    caption = torch.randn(2, 16, 32, generator=generator)
    timestep = torch.tensor([10, 700])
    with torch.no_grad():
        got = ours(video, timestep, caption=caption)
        expected = reference.eval()(video.permute(0, 2, 1, 3, 4), timestep,
                                    encoder_hidden_states=caption).sample.permute(0, 2, 1, 3, 4)
    assert got.abs().max() > 1e-4
    torch.testing.assert_close(got, expected[:, :, :3], atol=1e-5, rtol=0)
    assert torch.equal(expected[:, :, 3:], torch.zeros_like(got))


def test_export_is_a_latte_pipeline_folder_with_the_runs_scheduler_and_step(t2v_run, tmp_path):
    written = export_run(t2v_run, tmp_path / "out")
    folder = written["diffusers"]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "LattePipeline" and index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert index["vae"] == [None, None] and index["_ristretto"]["text_encoder"] == "synthetic"
    scheduler = diffusers.DDIMScheduler.from_pretrained(str(folder / "scheduler"))
    # tiny-t2v: v-prediction on a zero-terminal-SNR cosine schedule, sampled from the last timestep
    settings = scheduler.config
    assert (settings.prediction_type, settings.timestep_spacing, settings.rescale_betas_zero_snr,
            settings.beta_schedule) == ("v_prediction", "trailing", True, "squaredcos_cap_v2")
    pipe = diffusers.LattePipeline.from_pretrained(str(folder), vae=None, text_encoder=None, tokenizer=None)
    assert pipe.transformer.config["_ristretto"] == {"step": 2, "zero_sigma_channels": True}
    record = json.loads((tmp_path / "out" / "export.json").read_text())
    assert record["step"] == 2 and record["config"]["model"]["hidden_size"] == 32
    assert "pipe(prompt_embeds=prompt_embeds" in (folder / "README.md").read_text()


def test_an_export_can_start_a_new_run(t2v_run, tmp_path):
    written = export_run(t2v_run, tmp_path / "out")
    ema = load_file(str(t2v_run / "weights" / "ema.safetensors"))
    for folder in (written["diffusers"], written["ristretto"]):
        config = build_config("tiny-t2v", TINY + [f"model.init={folder}"])
        assert config.model.learn_sigma is False and config.model.hidden_size == 32
        model, _, _ = build_training_model(config, torch.device("cpu"))
        assert all(torch.equal(model.state_dict()[k], v) for k, v in ema.items())


def test_an_older_checkpoint_does_not_overwrite_a_newer_export(t2v_run, tmp_path, capsys):
    out = tmp_path / "out"
    export_run(t2v_run, out)
    record = json.loads((out / "export.json").read_text())
    (out / "export.json").write_text(json.dumps(record | {"step": 99}))
    with pytest.raises(ExportError, match="step 99, newer than this run's step 2; pass --force"):
        export_run(t2v_run, out)
    assert main(["--run", str(t2v_run), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["--run", str(t2v_run), "--out", str(out), "--force"]) == 0
    assert json.loads((out / "export.json").read_text())["step"] == 2


def test_a_newer_checkpoint_wins_over_stale_final_weights(t2v_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(t2v_run, run_dir)
    stale = {k: torch.zeros_like(v) for k, v in load_file(str(run_dir / "weights" / "ema.safetensors")).items()}
    save_file(stale, str(run_dir / "weights" / "ema.safetensors"))  # e.g. a resumed run stopped before its end
    exported = load_file(str(export_run(run_dir)["ristretto"] / "model.safetensors"))
    ema = load_file(str(run_dir / "checkpoints" / "step_00000002" / "ema.safetensors"))
    assert all(torch.equal(exported[k], ema[k]) for k in ema)


def test_export_falls_back_to_the_newest_checkpoint(t2v_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(t2v_run, run_dir)
    shutil.rmtree(run_dir / "weights")  # e.g. a run stopped by SIGTERM: checkpoints only
    written = export_run(run_dir, tmp_path / "out")
    exported = load_file(str(written["ristretto"] / "model.safetensors"))
    ema = load_file(str(t2v_run / "checkpoints" / "step_00000002" / "ema.safetensors"))
    assert all(torch.equal(exported[k], ema[k]) for k in ema)


def test_class_model_exports_our_format_only(tmp_path):
    run_dir = tmp_path / "run"
    train(build_config("tiny-class", TINY + ["train.max_steps=1"]), run_dir)
    written = export_run(run_dir)
    assert set(written) == {"ristretto"}
    assert not (run_dir / "export" / "diffusers").exists()


def test_export_cli_names_a_bad_run_folder(tmp_path, capsys):
    assert main(["--run", str(tmp_path)]) == 2
    assert str(tmp_path / "config.json") in capsys.readouterr().err
