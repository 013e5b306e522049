"""Compact SPViT models: ViT / DeiT / Swin classifiers whose attention layers may be convolutions and whose MLPs are pruned.

This file imports only torch and transformers. flora_hf builds its pruned models from it, and `save_pretrained`
copies this very file (and modeling_flora.py, which it imports) into every checkpoint, so the checkpoint also loads with `trust_remote_code=True` where
flora_hf is not installed.

A compact SPViT model is its stock transformers classifier with two changes, driven by its config:
- `spvit_ops` (`{layer path: op}`): the op that replaces a layer's multi-head self-attention (MSA): `"msa"`
  (kept), `"conv3x3"` / `"conv1x1"` (a bottleneck convolution over the patch grid; for Swin, over each attention
  window, zero-padded at its borders, as in SPViT's search) or `"skip"` (no attention branch);
- `spvit_mlp_sizes` (`{layer path: hidden units}`): the width each pruned MLP keeps.

FLORA can then decompose a pruned model: the `FloraSPViT*` classes add `flora_ranks` on top of the pruning.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import DeiTConfig, SwinConfig, ViTConfig
from transformers.models.deit.modeling_deit import (
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
)
from transformers.models.swin.modeling_swin import SwinForImageClassification
from transformers.models.vit.modeling_vit import ViTForImageClassification

from .modeling_flora import CompactModelMixin, FloraCompactMixin

SPVIT_OPS = ("skip", "conv1x1", "conv3x3", "msa")
"""The ops of an MSA layer, nested: each one uses a subset of the next one's parameters."""

KERNEL_SIZES = {"conv1x1": 1, "conv3x3": 3}


def num_prefix_tokens(model: nn.Module) -> int:
    """Tokens an attention layer sees before the patch tokens (ViT: [CLS]; DeiT: [CLS] and distillation; Swin: none)."""
    if isinstance(model, SwinForImageClassification):
        return 0  # Swin attention sees one window of patch tokens at a time
    embeddings = model.base_model.embeddings
    return embeddings.position_embeddings.shape[1] - embeddings.patch_embeddings.num_patches


def tokens_to_grid(patches: torch.Tensor) -> torch.Tensor:
    """(batch, tokens, channels) patch tokens -> (batch, channels, side, side) feature map."""
    batch, tokens, channels = patches.shape
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"convolutional attention needs a square patch grid, got {tokens} patch tokens")
    return patches.transpose(1, 2).reshape(batch, channels, side, side)


def grid_to_tokens(grid: torch.Tensor) -> torch.Tensor:
    return grid.flatten(2).transpose(1, 2)


class BottleneckConvAttention(nn.Module):
    """Stands in for an MSA layer: a k x k conv (hidden -> head_dim), BatchNorm, ReLU and a 1 x 1 conv back.

    It runs on the patch grid (Swin: on each attention window); prefix tokens ([CLS], distillation) pass through
    unchanged, as in SPViT.
    """

    def __init__(self, hidden_size: int, head_dim: int, kernel_size: int, num_prefix_tokens: int) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.conv_in = nn.Conv2d(hidden_size, head_dim, kernel_size, padding=kernel_size // 2)
        self.norm = nn.BatchNorm2d(head_dim)
        self.activation = nn.ReLU()
        self.conv_out = nn.Conv2d(head_dim, hidden_size, 1)

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs) -> tuple[torch.Tensor, None]:
        prefix, patches = hidden_states.split(
            [self.num_prefix_tokens, hidden_states.shape[1] - self.num_prefix_tokens], dim=1
        )
        grid = self.conv_out(self.activation(self.norm(self.conv_in(tokens_to_grid(patches)))))
        return torch.cat([prefix, grid_to_tokens(grid)], dim=1), None


class SkipAttention(nn.Module):
    """Stands in for an MSA layer that was pruned away: the attention branch adds nothing to the residual."""

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(hidden_states), None


def apply_spvit_architecture(model: nn.Module, ops: dict[str, str], mlp_sizes: dict[str, int]) -> None:
    """Turns a freshly built stock classifier into the pruned architecture of `ops` and `mlp_sizes`."""
    prefix = num_prefix_tokens(model)
    for path, op in ops.items():
        layer = model.get_submodule(path)
        if op == "msa":
            continue
        if op == "skip":
            layer.attention = SkipAttention()
        elif op in KERNEL_SIZES:
            attention = layer.attention
            layer.attention = BottleneckConvAttention(
                attention.o_proj.out_features, attention.head_dim, KERNEL_SIZES[op], prefix
            )
        else:
            raise ValueError(f"unknown SPViT op {op!r} for {path}; expected one of {SPVIT_OPS}")
    for path, size in mlp_sizes.items():
        mlp = model.get_submodule(path).mlp
        mlp.fc1 = nn.Linear(mlp.fc1.in_features, size, bias=mlp.fc1.bias is not None)
        mlp.fc2 = nn.Linear(size, mlp.fc2.out_features, bias=mlp.fc2.bias is not None)


class SPViTCompactMixin(CompactModelMixin):
    """Builds the stock classifier, then prunes it to the architecture in `config.spvit_ops` / `spvit_mlp_sizes`."""

    def __init__(self, config) -> None:
        super().__init__(config)
        apply_spvit_architecture(self, config.spvit_ops or {}, config.spvit_mlp_sizes or {})
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear) and 0 in module.weight.shape:
            return  # an MLP pruned to no hidden unit has nothing to initialize
        super()._init_weights(module)


class SPViTViTConfig(ViTConfig):
    model_type = "spvit_vit"
    spvit_ops: dict | None = None
    spvit_mlp_sizes: dict | None = None


class SPViTDeiTConfig(DeiTConfig):
    model_type = "spvit_deit"
    spvit_ops: dict | None = None
    spvit_mlp_sizes: dict | None = None


class SPViTDeiTDistilledConfig(DeiTConfig):
    """DeiT with its distillation head: a model type of its own so the Auto classes find the right head."""

    model_type = "spvit_deit_distilled"
    spvit_ops: dict | None = None
    spvit_mlp_sizes: dict | None = None


class SPViTSwinConfig(SwinConfig):
    model_type = "spvit_swin"
    spvit_ops: dict | None = None
    spvit_mlp_sizes: dict | None = None


class SPViTViTForImageClassification(SPViTCompactMixin, ViTForImageClassification):
    config_class = SPViTViTConfig


class SPViTDeiTForImageClassification(SPViTCompactMixin, DeiTForImageClassification):
    config_class = SPViTDeiTConfig


class SPViTDeiTForImageClassificationWithTeacher(SPViTCompactMixin, DeiTForImageClassificationWithTeacher):
    config_class = SPViTDeiTDistilledConfig


class SPViTSwinForImageClassification(SPViTCompactMixin, SwinForImageClassification):
    config_class = SPViTSwinConfig


SPVIT_CLASSES = {
    ViTForImageClassification: SPViTViTForImageClassification,
    DeiTForImageClassification: SPViTDeiTForImageClassification,
    DeiTForImageClassificationWithTeacher: SPViTDeiTForImageClassificationWithTeacher,
    SwinForImageClassification: SPViTSwinForImageClassification,
}
"""Stock classifier class -> its pruned SPViT class."""


class FloraSPViTViTConfig(SPViTViTConfig):
    model_type = "flora_spvit_vit"
    flora_ranks: dict | None = None


class FloraSPViTDeiTConfig(SPViTDeiTConfig):
    model_type = "flora_spvit_deit"
    flora_ranks: dict | None = None


class FloraSPViTDeiTDistilledConfig(SPViTDeiTDistilledConfig):
    model_type = "flora_spvit_deit_distilled"
    flora_ranks: dict | None = None


class FloraSPViTSwinConfig(SPViTSwinConfig):
    model_type = "flora_spvit_swin"
    flora_ranks: dict | None = None


class FloraSPViTViTForImageClassification(FloraCompactMixin, SPViTViTForImageClassification):
    config_class = FloraSPViTViTConfig


class FloraSPViTDeiTForImageClassification(FloraCompactMixin, SPViTDeiTForImageClassification):
    config_class = FloraSPViTDeiTConfig


class FloraSPViTDeiTForImageClassificationWithTeacher(FloraCompactMixin, SPViTDeiTForImageClassificationWithTeacher):
    config_class = FloraSPViTDeiTDistilledConfig


class FloraSPViTSwinForImageClassification(FloraCompactMixin, SPViTSwinForImageClassification):
    config_class = FloraSPViTSwinConfig


FLORA_SPVIT_CLASSES = {
    SPViTViTForImageClassification: FloraSPViTViTForImageClassification,
    SPViTDeiTForImageClassification: FloraSPViTDeiTForImageClassification,
    SPViTDeiTForImageClassificationWithTeacher: FloraSPViTDeiTForImageClassificationWithTeacher,
    SPViTSwinForImageClassification: FloraSPViTSwinForImageClassification,
}
"""Pruned SPViT class -> its FLORA low-rank class."""
