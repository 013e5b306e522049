"""Which transformers classifiers flora-hf supports, and where their decomposable layers are.

A FLORA block is one transformer layer with three groups: the joint q/k/v projection (`<attention>.qkv`)
and the MLP's `fc1` and `fc2`. Group names are module paths in the classifier, so the same names address the
dense model, the supernet's wrapped model and the compact export.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import UnsupportedModelError
from .modeling_flora import COMPACT_CLASSES, QKV_NAMES
from .modeling_spvit import FLORA_SPVIT_CLASSES

FLORA_CLASSES = {**COMPACT_CLASSES, **FLORA_SPVIT_CLASSES}
"""Every classifier FLORA decomposes (stock ViT / DeiT / Swin and SPViT-pruned ViT / DeiT) -> its compact class."""
SUPPORTED_CLASSES = tuple(cls.__name__ for cls in FLORA_CLASSES)


@dataclass(frozen=True)
class GroupShape:
    """One decomposable group: a linear map `in_features -> out_features`."""

    name: str
    in_features: int
    out_features: int

    @property
    def full_rank(self) -> int:
        return min(self.in_features, self.out_features)


def check_supported(model: nn.Module) -> None:
    """Raises `UnsupportedModelError` unless `model` is a stock classifier flora-hf can decompose."""
    if type(model) not in FLORA_CLASSES:
        raise UnsupportedModelError(
            f"{type(model).__name__} is not supported: flora-hf decomposes the transformers image classifiers "
            f"{', '.join(SUPPORTED_CLASSES)}."
        )


def find_blocks(model: nn.Module) -> list[tuple[GroupShape, GroupShape, GroupShape]]:
    """The (qkv, fc1, fc2) groups of every transformer layer of a dense stock classifier, in forward order."""
    check_supported(model)
    blocks = []
    for path, module in model.named_modules():
        attention, mlp = getattr(module, "attention", None), getattr(module, "mlp", None)
        if attention is None or mlp is None or not all(hasattr(attention, name) for name in QKV_NAMES):
            continue
        q, k, v = (getattr(attention, name) for name in QKV_NAMES)
        qkv = GroupShape(f"{path}.attention.qkv", q.in_features, q.out_features + k.out_features + v.out_features)
        fc1 = GroupShape(f"{path}.mlp.fc1", mlp.fc1.in_features, mlp.fc1.out_features)
        fc2 = GroupShape(f"{path}.mlp.fc2", mlp.fc2.in_features, mlp.fc2.out_features)
        blocks.append((qkv, fc1, fc2))
    if not blocks:
        raise UnsupportedModelError(f"found no transformer layers with q/k/v and fc1/fc2 in {type(model).__name__}")
    return blocks
