"""Activation checkpointing, applied to a built model from outside (the model has no checkpoint flag).

Modes: none | full (every block) | every-k (every k-th block) | selective-mlp (keep attention outputs, recompute each
MLP) | selective-attention (keep MLP activations, recompute attention) | auto (a choice per block from
BLOCK_CHOICES, made by the memory planner: engine/plan.py `auto_choices`). The wrapped module stays in place (its
forward is replaced on the instance), so parameter names and state dicts are unchanged.

Recompute runs in backward, outside the forward's contexts. torch's checkpoint restores torch.autocast itself; FP8
contexts it does not know (Transformer Engine's) come back through the `checkpoint_fn` the precision supplies
(engine/precision.Precision.checkpoint_function: TE's checkpoint), whichever modules a mode picks.
"""
from functools import partial
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

CHECKPOINTING_MODES = ("none", "full", "every-k", "selective-mlp", "selective-attention")  # fixed modes
AUTO = "auto"
BLOCK_CHOICES = ("none", "mlp", "attention", "full")  # what `auto` may recompute in one block


def checkpoint_module(module: nn.Module, checkpoint_fn: Callable | None = None) -> None:
    """Recompute `module`'s forward during backward instead of saving its activations. `checkpoint_fn(function,
    *args, **kwargs)` replaces torch's non-reentrant checkpoint (fp8-te: TE's, which re-enters the FP8 context)."""
    forward = module.forward
    recompute = checkpoint_fn or partial(checkpoint, use_reentrant=False)

    def checkpointed_forward(*args, **kwargs):
        if not torch.is_grad_enabled():  # sampling: nothing to save, nothing to recompute
            return forward(*args, **kwargs)
        return recompute(forward, *args, **kwargs)

    module.forward = checkpointed_forward


def block_modules(block: nn.Module, choice: str) -> list[nn.Module]:
    """The modules of one block that `choice` (one of BLOCK_CHOICES) recomputes."""
    if choice == "full":
        return [block]
    if choice == "mlp":
        return [block.mlp]
    if choice == "attention":
        return [part for part in (block.attn, block.cross_attn) if part is not None]
    return []


def modules_to_checkpoint(model: nn.Module, mode: str, every: int = 2,
                          choices: list[str] | None = None) -> list[nn.Module]:
    """The modules `mode` recomputes: whole blocks, or the MLP / attention parts of every block; for `auto`, what
    `choices` (one of BLOCK_CHOICES per block, in model order) names."""
    blocks = list(model.blocks)
    if mode == AUTO:
        if choices is None or len(choices) != len(blocks) or any(c not in BLOCK_CHOICES for c in choices):
            raise ValueError(f"train.checkpointing=auto: needs one of {BLOCK_CHOICES} per block ({len(blocks)} "
                             f"blocks), got {choices!r}")
        return [module for block, choice in zip(blocks, choices) for module in block_modules(block, choice)]
    if mode not in CHECKPOINTING_MODES:
        raise ValueError(f"train.checkpointing: got {mode!r}; expected one of "
                         f"{', '.join((*CHECKPOINTING_MODES, AUTO))}")
    if mode == "full":
        return blocks
    if mode == "every-k":
        return blocks[::every]
    if mode == "selective-mlp":
        return [block.mlp for block in blocks]
    if mode == "selective-attention":
        return [part for block in blocks for part in (block.attn, block.cross_attn) if part is not None]
    return []


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 2,
                                   choices: list[str] | None = None, checkpoint_fn: Callable | None = None) -> int:
    """Wrap the modules `mode` (and for `auto` the per-block `choices`) names, recomputing through `checkpoint_fn`
    (see checkpoint_module); returns how many were wrapped."""
    modules = modules_to_checkpoint(model, mode, every, choices)
    for module in modules:
        checkpoint_module(module, checkpoint_fn)
    return len(modules)
