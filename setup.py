"""Ristretto: installs the top-level folders as the namespace package `ristretto`.

torch is required but not pinned to a build: on a machine without an NVIDIA GPU install PyTorch's CPU wheel first
(`pip install torch --index-url https://download.pytorch.org/whl/cpu`, README) and pip keeps it; on a GPU machine
the default wheel brings CUDA and Triton, all the GPU path needs. GPU-only extras (FP8 backends, flash-attention) stay
optional and are imported only by the feature that uses them.

`ristretto` itself has no folder: each design-card folder maps to a sub-package, so nothing generic such as
`model` or `kernels` lands in site-packages.
"""
from setuptools import setup

SUBPACKAGES = ["kernels", "model", "engine", "bench"]

setup(
    name="ristretto",
    version="0.1.0",
    description="A lean trainer for Latte-style latent video diffusion transformers",
    python_requires=">=3.10",
    packages=[f"ristretto.{name}" for name in SUBPACKAGES],
    package_dir={f"ristretto.{name}": name for name in SUBPACKAGES},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "diffusers>=0.32",
        "safetensors",
        "tqdm",
        "pillow",
        "matplotlib",  # the plots of every run's report.html (engine/report.py) and the benchmarks' charts
    ],
    extras_require={
        "video": ["av"],
        "hub": ["transformers", "sentencepiece", "tokenizers", "huggingface_hub"],
        "fp8": ["torchao"],
        "log": ["tensorboard", "wandb"],
        "dev": ["pytest", "pytest-benchmark", "triton", "av", "transformers", "sentencepiece", "tokenizers", "matplotlib", "torchao",
                "tensorboard"],
    },
    entry_points={
        "console_scripts": [
            "ristretto-train=ristretto.engine.cli:main",
            "ristretto-sample=ristretto.engine.sample:main",
            "ristretto-bench=ristretto.bench.__main__:main",
            "ristretto-plan=ristretto.engine.plan:main",
            "ristretto-cache=ristretto.engine.cache:main",
            "ristretto-export=ristretto.engine.export:main",
            "ristretto-report=ristretto.engine.report:main",
        ]
    },
)
