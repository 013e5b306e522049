"""Multiply-accumulates (MACs) and parameters per image, for dense models, supernets at a subnet and compact models.

Counted, as in FLORA: linear and convolution layers and the two attention matmuls (q k^T and attention-weighted
values; per window for Swin). Not counted: norms, softmax, activations, bias and residual adds. A group at
ratio r < 1 costs `tokens * min(in * out, rank * (in + out))`: the exported layer is low-rank only where that
is cheaper than dense.

The token count each layer sees comes from one batch-1 forward pass with shape-recording hooks, made once per
model; after that the cost of any subnet is arithmetic, cheap enough for evolutionary search.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import SearchSpaceError
from .modeling_flora import QKV_NAMES
from .search_space import FloraSearchSpace, group_cost
from .spvit import SPViTSupernetForImageClassification
from .supernet import FloraSuperLinear, FloraSupernetForImageClassification


@dataclass
class _Profile:
    fixed_macs: int = 0
    group_tokens: dict[str, int] = field(default_factory=dict)


_PROFILES: "weakref.WeakKeyDictionary[nn.Module, _Profile]" = weakref.WeakKeyDictionary()


def _base_model(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, FloraSupernetForImageClassification) else model


def _space(model: nn.Module) -> FloraSearchSpace | None:
    if isinstance(model, FloraSupernetForImageClassification):
        return model.space
    return None


def _group_of(path: str, groups: set[str]) -> str | None:
    """The group a dense module belongs to (q/k/v projections belong to their attention's joint group)."""
    if path in groups:
        return path
    parent, _, name = path.rpartition(".")
    if name in QKV_NAMES and f"{parent}.qkv" in groups:
        return f"{parent}.qkv"
    return None


@torch.no_grad()
def _profile(model: nn.Module, groups: set[str]) -> _Profile:
    profile = _Profile()
    hooks = []

    def on_linear(path, module, inputs, output):
        tokens = inputs[0].numel() // module.in_features
        group = _group_of(path, groups)
        if group is None:
            profile.fixed_macs += tokens * module.in_features * module.out_features
        elif not path.endswith(QKV_NAMES[1:]):  # the q projection stands for the whole q/k/v group
            profile.group_tokens[group] = tokens

    def on_conv(module, inputs, output):
        kernel = module.weight.shape[1] * module.weight.shape[2] * module.weight.shape[3]
        profile.fixed_macs += output.numel() * kernel

    def on_attention(module, args, kwargs):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        windows, length = hidden_states.shape[0], hidden_states.shape[1]
        inner = module.num_attention_heads * module.head_dim
        profile.fixed_macs += 2 * windows * length * length * inner

    for path, module in model.named_modules():
        if isinstance(module, (nn.Linear, FloraSuperLinear)):
            if not isinstance(module, FloraSuperLinear) and isinstance(_owner(model, path), FloraSuperLinear):
                continue  # factors of a super layer are sliced, not called
            hooks.append(module.register_forward_hook(lambda m, i, o, p=path: on_linear(p, m, i, o)))
        elif isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(on_conv))
        elif hasattr(module, QKV_NAMES[0]) and hasattr(module, "num_attention_heads") and hasattr(module, "head_dim"):
            hooks.append(module.register_forward_pre_hook(on_attention, with_kwargs=True))
    config = model.config
    size = config.image_size if isinstance(config.image_size, (tuple, list)) else (config.image_size,) * 2
    param = next(model.parameters())
    pixel_values = torch.zeros(1, config.num_channels, *size, device=param.device, dtype=param.dtype)
    try:
        model(pixel_values=pixel_values)
    finally:
        for hook in hooks:
            hook.remove()
    return profile


def _owner(model: nn.Module, path: str) -> nn.Module | None:
    parent = path.rpartition(".")[0]
    return model.get_submodule(parent) if parent else None


def _subnet_ranks(model: nn.Module, subnet: Mapping[str, float] | None) -> tuple[FloraSearchSpace | None, dict]:
    space = _space(model)
    if subnet is None:
        if isinstance(model, FloraSupernetForImageClassification):
            subnet = model.active_subnet
        else:
            return None, {}
    if space is None:
        space = FloraSearchSpace.from_model(model, ratios=sorted({float(r) for r in subnet.values()} | {1.0}))
    return space, space.ranks(subnet)


def count_macs(model: nn.Module, subnet: Mapping[str, float] | None = None) -> int:
    """MACs per image of a dense classifier, a supernet (at `subnet`, default its active one) or a compact model.

    A dense classifier with a `subnet` is counted as that subnet would run after decomposition. An SPViT
    supernet is counted as the pruned model its gates choose now.
    """
    if isinstance(model, SPViTSupernetForImageClassification):
        _no_subnet_for_spvit(subnet)
        return model.count_macs()
    space, ranks = _subnet_ranks(model, subnet)
    groups = set(ranks)
    base = _base_model(model)
    profile = _PROFILES.get(base)
    if profile is None or set(profile.group_tokens) != groups:
        profile = _profile(base, groups)
        _PROFILES[base] = profile
    total = profile.fixed_macs
    if space is not None:
        for group in space.groups:
            total += profile.group_tokens[group.name] * group_cost(group.in_features, group.out_features, ranks[group.name])
    return int(total)


def count_params(model: nn.Module, subnet: Mapping[str, float] | None = None) -> int:
    """Parameters of a model, or of the compact model a subnet of a supernet / dense classifier exports to."""
    if isinstance(model, SPViTSupernetForImageClassification):
        _no_subnet_for_spvit(subnet)
        return sum(p.numel() for p in model.export_pruned().parameters())
    space, ranks = _subnet_ranks(model, subnet)
    base = _base_model(model)
    if space is None:
        return sum(p.numel() for p in base.parameters())
    group_weights = set()  # weight matrices a subnet replaces; biases stay as they are
    for group in space.groups:
        parent, _, name = group.name.rpartition(".")
        modules = [f"{parent}.{n}" for n in QKV_NAMES] if name == "qkv" else []
        group_weights.update(f"{m}.weight" for m in (*modules, group.name))
        group_weights.update(f"{group.name}.{factor}.weight" for factor in ("down", "up"))
    total = sum(p.numel() for path, p in base.named_parameters() if path not in group_weights)
    for group in space.groups:
        total += group_cost(group.in_features, group.out_features, ranks[group.name])
    return total


def _no_subnet_for_spvit(subnet: Mapping[str, float] | None) -> None:
    if subnet is not None:
        raise SearchSpaceError("an SPViT supernet has no FLORA subnets: its gates choose the architecture")
