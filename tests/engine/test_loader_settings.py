"""The input pipeline keeps up: data.* loader settings reach the DataLoader (workers, prefetch, pinned memory on
CUDA, persistent workers), the real-data presets load with workers, and a GPU run that would encode live or decode
video in the training process says so loudly at the start."""
import pytest
import torch

from ristretto.engine.config import ConfigError, build_config
from ristretto.engine.datasets import build_dataset, loader_for
from ristretto.engine.sampler import ResumableSampler
from ristretto.engine.train import input_pipeline_warnings


def test_loader_settings_reach_the_dataloader():
    config = build_config("tiny-t2v", ["data.num_workers=2", "data.prefetch_factor=3", "data.synthetic_size=8",
                                       "train.batch_size=2"])
    dataset = build_dataset(config)
    sampler = ResumableSampler(len(dataset), seed=0, block=2)
    loader = loader_for(config, dataset, sampler, "cuda")
    assert (loader.num_workers, loader.prefetch_factor, loader.persistent_workers, loader.pin_memory) == (2, 3, True, True)
    assert not loader_for(config, dataset, sampler, "cpu").pin_memory  # pinning only helps copies to a GPU
    config.data.pin_memory, config.data.persistent_workers = False, False
    loader = loader_for(config, dataset, sampler, "cuda")
    assert not loader.pin_memory and not loader.persistent_workers
    config.data.num_workers = 0
    loader = loader_for(config, dataset, sampler, "cpu")
    assert loader.num_workers == 0 and loader.prefetch_factor is None and not loader.persistent_workers
    with pytest.raises(ConfigError, match="data.num_workers: must be >= 0"):
        build_config("tiny-t2v", ["data.num_workers=-1"])
    with pytest.raises(ConfigError, match="data.prefetch_factor: must be >= 1"):
        build_config("tiny-t2v", ["data.prefetch_factor=0"])


def test_real_data_presets_load_with_workers():
    assert build_config("latte-xl2-ucf").data.num_workers >= 4
    t2v = build_config("latte-t2v-512")
    assert t2v.data.kind == "cached" and t2v.data.num_workers >= 1
    assert build_config("tiny-t2v").data.num_workers == 0  # synthetic clips are generated in microseconds


def test_gpu_runs_that_encode_live_or_decode_in_process_say_so():
    cuda = torch.device("cuda")
    live = input_pipeline_warnings(build_config("latte-xl2-ucf"), cuda)
    assert len(live) == 1 and live[0].startswith("ENCODING LIVE") and "ristretto.engine.cache" in live[0]
    assert input_pipeline_warnings(build_config("latte-t2v-512"), cuda) == []
    assert input_pipeline_warnings(build_config("latte-xl2-ucf"), torch.device("cpu")) == []
    in_process = input_pipeline_warnings(build_config("latte-xl2-ucf", ["data.num_workers=0"]), cuda)
    assert len(in_process) == 2 and "data.num_workers=0" in in_process[1]
    assert input_pipeline_warnings(build_config("tiny-t2v"), cuda) == []
