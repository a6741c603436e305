"""End to end: a run's export, loaded by diffusers' own LattePipeline (tiny random AutoencoderKL, T5EncoderModel and
an offline word-level tokenizer, all copied into the export by engine/export.py), gives the same result as our
sampler (engine/sample.py) from the same noise in 2 DDIM steps (v-prediction, zero terminal SNR: tiny-t2v's recipe).

Masks, the same on both sides: with one prompt the pipeline cuts T5's output to the prompt's real tokens, which
equals our cross-attention mask over the padded caption (test 1, no guidance: the pipeline cuts the negative prompt
to the positive prompt's length, so it attends to padding that we mask). With guidance, prompt_embeds and
negative_prompt_embeds are passed directly and our sampler gets all-true masks (test 2).
Tolerance: fp32, |diff| <= 1e-4 + 1e-4 |value| (operation order: fused q|k|v, batch order of the CFG halves).
"""
import json

import pytest
import torch

from ristretto.engine.build import build_plain_model
from safetensors.torch import save_file

from ristretto.engine.config import build_config, config_to_dict
from ristretto.engine.export import export_run
from ristretto.engine.run_assets import load_inference_model
from ristretto.engine.sample import conditions_for, generate, null_conditions_for

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = ["a", "red", "blue", "circle", "square", "moving", "left", "right"]
SEED, STEPS, FRAMES, RESOLUTION = 7, 2, 3, 32


def save_tiny_t5(folder):
    """T5EncoderModel (width 24) + a word-level tokenizer that appends </s> like T5's, built offline."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {word: i + 3 for i, word in enumerate(WORDS)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.post_processor = tokenizers.processors.TemplateProcessing(single="$A </s>",
                                                                      special_tokens=[("</s>", 1)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                                     unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=len(vocab), d_model=24, d_kv=8, d_ff=32, num_layers=1, num_heads=3)
    transformers.T5EncoderModel(config).save_pretrained(folder)


def save_tiny_vae(folder):
    torch.manual_seed(1)
    diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(8,) * 4, layers_per_block=1, latent_channels=4, norm_num_groups=4,
                            sample_size=RESOLUTION).save_pretrained(folder)  # 8x downsampling, like the SD VAE


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    save_tiny_t5(root / "t5")
    save_tiny_vae(root / "vae")
    config = build_config("tiny-t2v", [
        f"model.vae={root / 'vae'}", "model.vae_scaling_factor=0.5", f"model.text_encoder={root / 't5'}",
        "model.in_channels=4", "model.caption_channels=24", "model.caption_length=10", "model.hidden_size=32",
        "model.num_heads=2", "model.depth=2", "model.patch_size=2", f"data.frames={FRAMES}",
        f"data.resolution={RESOLUTION}", f"diffusion.sample_steps={STEPS}", "train.device=cpu"])
    model = build_plain_model(config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # random everywhere: zero-initialised outputs would hide mistakes
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    run_dir = root / "run"
    (run_dir / "weights").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(config_to_dict(config)))
    save_file(model.state_dict(), str(run_dir / "weights" / "ema.safetensors"))
    folder = export_run(run_dir)["diffusers"]
    pipe = diffusers.LattePipeline.from_pretrained(str(folder))  # every component from the export folder
    return config, run_dir, pipe


def noise(batch: int, config) -> torch.Tensor:
    """The noise our generate() draws for seed SEED, [B, F, C, h, w]."""
    size = RESOLUTION // 8
    generator = torch.Generator().manual_seed(SEED)
    return torch.randn((batch, FRAMES, config.model.in_channels, size, size), generator=generator)


def pipeline_latents(pipe, batch: int, config, **kwargs) -> torch.Tensor:
    out = pipe(video_length=FRAMES, height=RESOLUTION, width=RESOLUTION, num_inference_steps=STEPS,
               latents=noise(batch, config).permute(0, 2, 1, 3, 4), output_type="latent", clean_caption=False,
               **kwargs).frames
    return out.permute(0, 2, 1, 3, 4)  # (B, C, F, h, w) -> ours (B, F, C, h, w)


def test_pipeline_loads_every_component_from_the_export(exported):
    config, _, pipe = exported
    assert isinstance(pipe.scheduler, diffusers.DDIMScheduler)
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.scheduler.config.rescale_betas_zero_snr
    assert pipe.vae.config.scaling_factor == 0.5  # the run's factor, not the VAE folder's default
    assert pipe.text_encoder is not None and pipe.tokenizer("a red circle").input_ids[-1] == 1


def test_one_prompt_without_guidance_equals_our_sampler_and_decoder(exported):
    config, run_dir, pipe = exported
    model, vae, text_encoder, diffusion, device = load_inference_model(config, run_dir)
    prompt = "a red circle moving left"  # 6 of 10 caption tokens: 4 padded, masked on our side
    conditions = conditions_for(config, [prompt], text_encoder, device)
    assert conditions["caption_mask"].sum() == 6
    ours = generate(model, diffusion, conditions, conditions, noise(1, config).shape, 1.0, STEPS, SEED, device)
    theirs = pipeline_latents(pipe, 1, config, prompt=prompt, guidance_scale=1.0)
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    video = pipe(prompt=prompt, video_length=FRAMES, height=RESOLUTION, width=RESOLUTION, num_inference_steps=STEPS,
                 latents=noise(1, config).permute(0, 2, 1, 3, 4), guidance_scale=1.0, output_type="pt",
                 clean_caption=False).frames  # (B, F, 3, H, W) in [0, 1]
    torch.testing.assert_close(video, (vae.decode(ours).clamp(-1, 1) + 1) / 2, atol=1e-4, rtol=1e-4)


def test_guided_batch_with_embeddings_passed_directly_equals_our_sampler(exported):
    config, run_dir, pipe = exported
    model, _, text_encoder, diffusion, device = load_inference_model(config, run_dir)
    prompts = ["a blue square moving right", "a red circle"]
    conditions = conditions_for(config, prompts, text_encoder, device)
    null = null_conditions_for(config, len(prompts), text_encoder, device)
    for condition in (conditions, null):  # the pipeline passes no mask with given embeddings: attend to all tokens
        condition["caption_mask"] = torch.ones_like(condition["caption_mask"])
    ours = generate(model, diffusion, conditions, null, noise(2, config).shape, 4.0, STEPS, SEED, device)
    theirs = pipeline_latents(pipe, 2, config, prompt_embeds=conditions["caption"],
                              negative_prompt=None, negative_prompt_embeds=null["caption"], guidance_scale=4.0)
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
