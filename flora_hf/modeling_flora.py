"""Compact FLORA models: transformers ViT / DeiT / Swin classifiers whose q/k/v and MLP layers are low-rank.

This file imports only torch and transformers. flora_hf builds its compact models from it, and
`save_pretrained` copies this very file into every checkpoint, so the checkpoint also loads with
`trust_remote_code=True` where flora_hf is not installed.

A compact model is its stock transformers classifier with two changes, both driven by `config.flora_ranks`
(`{group name: rank, or None for a dense layer}`):
- in every attention module, q_proj / k_proj / v_proj become three slices of one joint projection `qkv`
  (d -> 3d), so the shared down-projection runs once per forward;
- every group with a rank becomes a `LowRankLinear` (`down`: in -> r, `up`: r -> out, bias on `up`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import DeiTConfig, SwinConfig, ViTConfig
from transformers.models.deit.modeling_deit import (
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
)
from transformers.models.swin.modeling_swin import SwinForImageClassification
from transformers.models.vit.modeling_vit import ViTForImageClassification

QKV_NAMES = ("q_proj", "k_proj", "v_proj")


class LowRankLinear(nn.Module):
    """A rank-r factorization `up(down(x))` of an `nn.Linear(in_features, out_features)`."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(hidden_states))


class QKVSlice(nn.Module):
    """Stands in for one of q_proj / k_proj / v_proj and returns its third of the joint `qkv` output.

    The attention module calls its three projections on the same tensor; the first call computes the joint
    output once and the other two reuse it, so the attention's own forward stays untouched. The joint
    projection is held outside the module tree: its parameters belong to the attention module's `qkv`.
    """

    def __init__(self, qkv: nn.Module, index: int, shared: dict) -> None:
        super().__init__()
        self.index = index
        self._joint = (qkv, shared)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, shared = self._joint
        if shared.get("input") is not hidden_states:
            shared.clear()
            shared.update(input=hidden_states, output=qkv(hidden_states).chunk(3, dim=-1), served=0)
        output = shared["output"][self.index]
        shared["served"] += 1
        if shared["served"] == len(QKV_NAMES):
            shared.clear()  # free the activation as soon as q, k and v have been served
        return output


def fuse_qkv(attention: nn.Module, qkv: nn.Module) -> None:
    """Installs `qkv` (d -> 3d) as `attention.qkv` and routes q_proj / k_proj / v_proj through it."""
    attention.qkv = qkv
    shared: dict = {}
    for index, name in enumerate(QKV_NAMES):
        setattr(attention, name, QKVSlice(qkv, index, shared))


def qkv_group_to_attention(group: str) -> str | None:
    """The attention module path of a joint q/k/v group name, or None for an MLP group."""
    return group[: -len(".qkv")] if group.endswith(".qkv") else None


def apply_flora_ranks(model: nn.Module, flora_ranks: dict[str, int | None]) -> None:
    """Turns a freshly built stock classifier into the compact architecture described by `flora_ranks`."""
    for group, rank in flora_ranks.items():
        attention_path = qkv_group_to_attention(group)
        if attention_path is not None:
            attention = model.get_submodule(attention_path)
            q, k, v = (getattr(attention, name) for name in QKV_NAMES)
            in_features, out_features = q.in_features, q.out_features + k.out_features + v.out_features
            bias = q.bias is not None
        else:
            dense = model.get_submodule(group)
            in_features, out_features, bias = dense.in_features, dense.out_features, dense.bias is not None
        if rank is None:
            layer = nn.Linear(in_features, out_features, bias=bias)
        else:
            layer = LowRankLinear(in_features, out_features, rank, bias=bias)
        if attention_path is not None:
            fuse_qkv(attention, layer)
        else:
            parent, _, name = group.rpartition(".")
            setattr(model.get_submodule(parent), name, layer)


class CompactModelMixin:
    """Saves a compact model ready to use: keys are module paths, plus its image processor and model card.

    `image_processor` and `model_card` (markdown), when set, are written by `save_pretrained` beside the
    weights, so a saved directory works in `pipeline()` and on the Hub as it is.
    """

    image_processor = None
    model_card: str | None = None

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        # keys stay the module paths (= FLORA group names) instead of transformers 4.x legacy ViT names
        kwargs.setdefault("save_original_format", False)
        super().save_pretrained(save_directory, *args, **kwargs)
        if self.image_processor is not None:
            self.image_processor.save_pretrained(save_directory)
        if self.model_card is not None:
            Path(save_directory, "README.md").write_text(self.model_card)


class FloraCompactMixin(CompactModelMixin):
    """Builds the stock classifier, then swaps in the low-rank layers that `config.flora_ranks` names."""

    def __init__(self, config) -> None:
        super().__init__(config)
        apply_flora_ranks(self, config.flora_ranks or {})
        self.post_init()


class FloraViTConfig(ViTConfig):
    model_type = "flora_vit"
    flora_ranks: dict | None = None


class FloraDeiTConfig(DeiTConfig):
    model_type = "flora_deit"
    flora_ranks: dict | None = None


class FloraDeiTDistilledConfig(DeiTConfig):
    """DeiT with its distillation head: a model type of its own so the Auto classes find the right head."""

    model_type = "flora_deit_distilled"
    flora_ranks: dict | None = None


class FloraSwinConfig(SwinConfig):
    model_type = "flora_swin"
    flora_ranks: dict | None = None


class FloraViTForImageClassification(FloraCompactMixin, ViTForImageClassification):
    config_class = FloraViTConfig


class FloraDeiTForImageClassification(FloraCompactMixin, DeiTForImageClassification):
    config_class = FloraDeiTConfig


class FloraDeiTForImageClassificationWithTeacher(FloraCompactMixin, DeiTForImageClassificationWithTeacher):
    config_class = FloraDeiTDistilledConfig


class FloraSwinForImageClassification(FloraCompactMixin, SwinForImageClassification):
    config_class = FloraSwinConfig


COMPACT_CLASSES = {
    ViTForImageClassification: FloraViTForImageClassification,
    DeiTForImageClassification: FloraDeiTForImageClassification,
    DeiTForImageClassificationWithTeacher: FloraDeiTForImageClassificationWithTeacher,
    SwinForImageClassification: FloraSwinForImageClassification,
}
"""Stock classifier class -> its compact FLORA class."""
