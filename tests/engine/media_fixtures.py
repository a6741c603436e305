"""Tiny on-disk media and models for the data and cache tests: made in tmp_path, nothing downloaded.

Videos are lossless H.264 whose frame i is a uniform grey of level(i), so a test can tell which frames were decoded.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

WORDS = "a the red blue green car dog cat runs jumps walks left right up down ball video".split()


def level(frame_index: int) -> int:
    """Grey level of frame i in the test videos (distinct, 9 apart, inside [16, 232])."""
    return 16 + 9 * frame_index


def write_video(path: Path, frames: int, width: int = 48, height: int = 40, fps: int = 8) -> Path:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": "0", "preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            image = np.full((height, width, 3), level(i), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_corrupt(path: Path, seed: int = 0) -> Path:
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path


def write_image(path: Path, value: int, width: int = 30, height: int = 20) -> Path:
    from PIL import Image

    Image.fromarray(np.full((height, width, 3), value, dtype=np.uint8)).save(path)
    return path


def save_tiny_vae(folder: Path) -> Path:
    """A random 2-level AutoencoderKL (downsample 2, 4 latent channels), saved with save_pretrained."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        layers_per_block=1, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(folder)
    return folder


def save_tiny_t5(folder: Path, d_model: int = 16) -> Path:
    """A random 1-layer T5EncoderModel and a word-level tokenizer that appends </s>, saved with save_pretrained."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(vocab), d_model=d_model, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    T5EncoderModel(config).save_pretrained(folder)
    return folder
