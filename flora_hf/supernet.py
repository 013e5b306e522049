"""The weight-sharing low-rank supernet over a transformers ViT / DeiT / Swin classifier.

Every group holds ONE full-rank factorization `W = up @ down` (SVD weight inheritance); a subnet of rank r uses
the first r rows of `down` and the first r columns of `up`. Ratio 1.0 runs the exact dense product `up @ down`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

from .architectures import FLORA_CLASSES, GroupShape, check_supported
from .checkpoints import SUPERNET_MODEL_TYPE
from .errors import SearchSpaceError
from .modeling_flora import QKV_NAMES, fuse_qkv, qkv_group_to_attention
from .search_space import FloraSearchSpace, Subnet
from .wrapped_classifier import WrappedClassifierModel

FOLD_CHOICES = ("down", "official")


class FloraSuperLinear(nn.Module):
    """A linear layer stored as its full-rank factors; `rank` selects the nested rank-r slice (None: dense)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        full_rank = min(in_features, out_features)
        self.down = nn.Linear(in_features, full_rank, bias=False)
        self.up = nn.Linear(full_rank, out_features, bias=bias)
        self.rank: int | None = None

    def sliced_factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.down.weight[:rank], self.up.weight[:, :rank]

    def dense_weight(self, rank: int | None = None) -> torch.Tensor:
        down, up = self.sliced_factors(self.up.weight.shape[1] if rank is None else rank)
        return up @ down

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.rank is None:
            return F.linear(hidden_states, self.dense_weight(), self.up.bias)
        down, up = self.sliced_factors(self.rank)
        return F.linear(F.linear(hidden_states, down), up, self.up.bias)

    @torch.no_grad()
    def inherit(self, weight: torch.Tensor, bias: torch.Tensor | None, fold: str) -> None:
        """SVD weight inheritance: `weight = U S V^T`, S folded into `down` (or into `up` when fold='up')."""
        u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
        if fold == "down":
            down, up = s[:, None] * vh, u
        else:
            down, up = vh, u * s
        self.down.weight.copy_(down)
        self.up.weight.copy_(up)
        if bias is not None:
            self.up.bias.copy_(bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class FloraSupernetConfig(PreTrainedConfig):
    """Configuration of a FLORA supernet: the wrapped classifier's config and class, and the search space.

    Args:
        base_config (`dict`): `to_dict()` of the dense classifier's config.
        base_architecture (`str`): class name of the dense classifier, e.g. `"ViTForImageClassification"`.
        search_space (`dict`): `FloraSearchSpace.to_dict()`.
        fold_singular_values (`str`): `"down"` folds S into the down-projection of every group; `"official"`
            folds it into the down-projection of qkv/fc1 and the up-projection of fc2, as the FLORA code does.
    """

    model_type = "flora_supernet"
    base_config: dict | None = None
    base_architecture: str | None = None
    search_space: dict | None = None
    fold_singular_values: str = "down"


class FloraSupernetForImageClassification(WrappedClassifierModel):
    """A dense classifier whose q/k/v and MLP layers are weight-sharing low-rank layers; see `set_subnet`."""

    config_class = FloraSupernetConfig
    supported_classes = tuple(FLORA_CLASSES)
    description = "flora-hf supernet"
    unsupported = "is not supported: flora-hf decomposes"

    def __init__(self, config: FloraSupernetConfig, model: PreTrainedModel | None = None) -> None:
        super().__init__(config)
        if model is None:
            model = self.rebuild_classifier(config)
        check_supported(model)
        self.model = model
        self.space = FloraSearchSpace.from_dict(config.search_space)
        for block in self.space.blocks:
            for group in block:
                self._install(group)
        self.active_subnet: Subnet | None = None
        self.post_init()
        self.set_subnet(self.space.max_subnet())

    def _install(self, group: GroupShape) -> None:
        attention_path = qkv_group_to_attention(group.name)
        if attention_path is not None:
            attention = self.model.get_submodule(attention_path)
            bias = getattr(attention, QKV_NAMES[0]).bias is not None
            fuse_qkv(attention, FloraSuperLinear(group.in_features, group.out_features, bias))
        else:
            parent, _, name = group.name.rpartition(".")
            dense = self.model.get_submodule(group.name)
            setattr(self.model.get_submodule(parent), name, FloraSuperLinear(group.in_features, group.out_features, dense.bias is not None))

    # construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_dense(
        cls, model: PreTrainedModel, space: FloraSearchSpace | None = None, fold_singular_values: str = "down"
    ) -> FloraSupernetForImageClassification:
        """Wraps a copy of `model` (left untouched) and initializes every group from the SVD of its weights."""
        check_supported(model)
        if fold_singular_values not in FOLD_CHOICES:
            raise SearchSpaceError(f"fold_singular_values must be one of {FOLD_CHOICES}, got {fold_singular_values!r}")
        space = space or FloraSearchSpace.from_model(model)
        space.check_model(model)
        dense = copy.deepcopy(model)
        weights = {}
        for group in space.groups:
            attention_path = qkv_group_to_attention(group.name)
            if attention_path is not None:
                layers = [dense.get_submodule(f"{attention_path}.{name}") for name in QKV_NAMES]
            else:
                layers = [dense.get_submodule(group.name)]
            weight = torch.cat([layer.weight for layer in layers])
            bias = None if layers[0].bias is None else torch.cat([layer.bias for layer in layers])
            weights[group.name] = (weight, bias)
        config = FloraSupernetConfig(
            base_config=model.config.to_dict(),
            base_architecture=type(model).__name__,
            search_space=space.to_dict(),
            fold_singular_values=fold_singular_values,
        )
        supernet = cls(config, model=dense)
        for name, (weight, bias) in weights.items():
            fold = "up" if fold_singular_values == "official" and name.endswith(".fc2") else "down"
            supernet.super_layer(name).inherit(weight, bias, fold)
        return supernet.train(model.training)

    # subnets ------------------------------------------------------------------------------------------------
    def super_layer(self, group: str) -> FloraSuperLinear:
        return self.model.get_submodule(group)

    def ranks(self, subnet: Mapping[str, float]) -> dict[str, int | None]:
        """Group -> rank of a subnet (None where the ratio is 1.0, i.e. the dense layer)."""
        return self.space.ranks(subnet)

    def set_subnet(self, subnet: Mapping[str, float]) -> None:
        """Makes forward run `subnet` until the next call."""
        for name, rank in self.ranks(subnet).items():
            self.super_layer(name).rank = rank
        self.active_subnet = {name: float(subnet[name]) for name in self.space.group_names}

    def forward(self, pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None, **kwargs):
        return self.model(pixel_values=pixel_values, labels=labels, **kwargs)

    # export -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def export_subnet(self, subnet: Mapping[str, float], image_processor=None) -> PreTrainedModel:
        """A compact classifier with real low-rank layers for `subnet`, computing what the supernet computes.

        `image_processor` (e.g. the dense model's) is saved with the compact model so `pipeline()` can use it.

        A rank that costs no fewer MACs than the dense layer (`r * (in + out) >= in * out`) is exported as the
        dense product of its factors: the same function, cheaper.
        """
        ranks = self.ranks(subnet)
        compact_ranks = {}
        state = dict(self.model.state_dict())
        for group in self.space.groups:
            rank = ranks[group.name]
            if rank is not None and rank * (group.in_features + group.out_features) >= group.in_features * group.out_features:
                rank = None
            layer = self.super_layer(group.name)
            key = group.name
            for suffix in ("down.weight", "up.weight", "up.bias"):
                state.pop(f"{key}.{suffix}", None)
            if rank is None:
                state[f"{key}.weight"] = layer.dense_weight().clone()
                if layer.up.bias is not None:
                    state[f"{key}.bias"] = layer.up.bias.clone()
            else:
                down, up = layer.sliced_factors(rank)
                state[f"{key}.down.weight"], state[f"{key}.up.weight"] = down.clone(), up.contiguous().clone()
                if layer.up.bias is not None:
                    state[f"{key}.up.bias"] = layer.up.bias.clone()
            compact_ranks[group.name] = rank
        compact_cls = FLORA_CLASSES[type(self.model)]
        config_dict = {k: v for k, v in self.model.config.to_dict().items() if k not in ("model_type", "architectures")}
        config = compact_cls.config_class(**config_dict, flora_ranks=compact_ranks)
        compact = compact_cls(config)
        compact.load_state_dict(state, strict=True)
        compact.image_processor = image_processor
        return compact.to(self.device, self.dtype).eval()

