"""The FLORA search space: one rank ratio per decomposable group, chosen per block as a (qkv, fc1, fc2) triple.

A subnet is a plain mapping `{group name: ratio}`. A block's allowed triples are either every combination of
the ratio choices or, after low-rank-aware candidate filtering, an explicit list.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .architectures import GroupShape, find_blocks
from .errors import SearchSpaceError
from .io import read_json, write_json

DEFAULT_RATIOS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 1.0)
FORMAT_NAME = "flora-search-space"
FORMAT_VERSION = 1

Subnet = dict[str, float]
Choice = tuple[float, float, float]


def check_ratio(ratio: float) -> float:
    """A ratio is a float in (0, 1]; anything else is an error naming it."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
        raise SearchSpaceError(f"invalid rank ratio {ratio!r}: ratios must be numbers in (0, 1]")
    return float(ratio)


def rank_for(group: GroupShape, ratio: float) -> int:
    """`round(ratio * min(in, out))`, the rank a ratio selects (at least 1)."""
    return max(1, round(ratio * group.full_rank))


def group_cost(in_features: int, out_features: int, rank: int | None) -> int:
    """Weights (= MACs per token) of a group at `rank` (None: dense); low-rank only where that is cheaper."""
    dense = in_features * out_features
    return dense if rank is None else min(dense, rank * (in_features + out_features))


def ratio_cost(group: GroupShape, ratio: float) -> int:
    """`group_cost` at a ratio; ratio 1.0 is the dense layer."""
    return group_cost(group.in_features, group.out_features, None if ratio == 1.0 else rank_for(group, ratio))


@dataclass(frozen=True)
class FloraSearchSpace:
    """Blocks of (qkv, fc1, fc2) groups, the ratio choices, and optionally each block's allowed triples."""

    blocks: tuple[tuple[GroupShape, GroupShape, GroupShape], ...]
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    block_choices: tuple[tuple[Choice, ...], ...] | None = None

    def __post_init__(self) -> None:
        if not self.ratios:
            raise SearchSpaceError("a search space needs at least one ratio choice")
        object.__setattr__(self, "ratios", tuple(sorted({check_ratio(r) for r in self.ratios})))
        for group in self.groups:
            for ratio in self.ratios:
                if round(ratio * group.full_rank) < 1:
                    raise SearchSpaceError(f"ratio {ratio} gives rank 0 for {group.name} (full rank {group.full_rank})")
        if self.block_choices is not None:
            if len(self.block_choices) != len(self.blocks):
                raise SearchSpaceError(
                    f"block_choices has {len(self.block_choices)} entries for {len(self.blocks)} blocks"
                )
            normalized = []
            for index, choices in enumerate(self.block_choices):
                choices = tuple(dict.fromkeys(tuple(float(r) for r in choice) for choice in choices))
                if not choices:
                    raise SearchSpaceError(f"block {index} has no allowed (qkv, fc1, fc2) choice")
                for choice in choices:
                    if len(choice) != 3 or any(r not in self.ratios for r in choice):
                        raise SearchSpaceError(
                            f"block {index} choice {choice} is not a triple of the space's ratios {self.ratios}"
                        )
                normalized.append(choices)
            object.__setattr__(self, "block_choices", tuple(normalized))

    # construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: nn.Module, ratios: Sequence[float] = DEFAULT_RATIOS) -> FloraSearchSpace:
        """The full space of a dense transformers ViT / DeiT / Swin classifier."""
        return cls(blocks=tuple(find_blocks(model)), ratios=tuple(ratios))

    def with_block_choices(self, block_choices: Sequence[Sequence[Choice]]) -> FloraSearchSpace:
        """The same space restricted to the given per-block triples (a filtered space)."""
        return FloraSearchSpace(self.blocks, self.ratios, tuple(tuple(c) for c in block_choices))

    # structure ----------------------------------------------------------------------------------------------
    @property
    def groups(self) -> list[GroupShape]:
        return [group for block in self.blocks for group in block]

    @property
    def group_names(self) -> list[str]:
        return [group.name for group in self.groups]

    def group(self, name: str) -> GroupShape:
        for group in self.groups:
            if group.name == name:
                return group
        raise SearchSpaceError(f"unknown group {name!r}")

    def choices(self, block: int) -> tuple[Choice, ...]:
        """The allowed (qkv, fc1, fc2) ratio triples of one block."""
        if self.block_choices is not None:
            return self.block_choices[block]
        return tuple(itertools.product(self.ratios, repeat=3))

    def num_subnets(self) -> int:
        return math.prod(len(self.choices(i)) for i in range(len(self.blocks)))

    # subnets ------------------------------------------------------------------------------------------------
    def subnet_from_choices(self, choices: Sequence[Choice]) -> Subnet:
        """Builds the subnet mapping from one triple per block."""
        return {g.name: float(r) for block, choice in zip(self.blocks, choices) for g, r in zip(block, choice)}

    def block_choices_of(self, subnet: Mapping[str, float]) -> list[Choice]:
        """The (qkv, fc1, fc2) triple of every block of a (validated) subnet."""
        return [tuple(subnet[g.name] for g in block) for block in self.blocks]

    def validate(self, subnet: Mapping[str, float]) -> Subnet:
        """Returns the subnet as a plain dict, or raises naming the first offending group or ratio."""
        if not isinstance(subnet, Mapping):
            raise SearchSpaceError(f"a subnet is a mapping {{group name: ratio}}, got {type(subnet).__name__}")
        names = self.group_names
        unknown = [name for name in subnet if name not in names]
        if unknown:
            raise SearchSpaceError(f"subnet names group {unknown[0]!r}, which is not in this search space")
        missing = [name for name in names if name not in subnet]
        if missing:
            raise SearchSpaceError(f"subnet gives no ratio for group {missing[0]!r}")
        for name in names:
            check_ratio(subnet[name])
            if float(subnet[name]) not in self.ratios:
                raise SearchSpaceError(
                    f"ratio {subnet[name]} for group {name!r} is not one of the space's choices {list(self.ratios)}"
                )
        clean = {name: float(subnet[name]) for name in names}
        for index, choice in enumerate(self.block_choices_of(clean)):
            if choice not in self.choices(index):
                raise SearchSpaceError(f"block {index} triple {choice} is not allowed in this (filtered) search space")
        return clean

    def choice_cost(self, block: int, choice: Choice) -> int:
        """Weights per token of one block's groups at a (qkv, fc1, fc2) triple: what min/max subnets order by."""
        return sum(ratio_cost(group, ratio) for group, ratio in zip(self.blocks[block], choice))

    def ranks(self, subnet: Mapping[str, float]) -> dict[str, int | None]:
        """Group -> rank of a (validated) subnet; None where the ratio is 1.0, i.e. the dense layer."""
        subnet = self.validate(subnet)
        return {g.name: None if subnet[g.name] == 1.0 else rank_for(g, subnet[g.name]) for g in self.groups}

    def max_subnet(self) -> Subnet:
        return self.subnet_from_choices([self._extreme(i, max) for i in range(len(self.blocks))])

    def min_subnet(self) -> Subnet:
        return self.subnet_from_choices([self._extreme(i, min) for i in range(len(self.blocks))])

    def _extreme(self, block: int, pick) -> Choice:
        return pick(self.choices(block), key=lambda choice: (self.choice_cost(block, choice), sum(choice), choice))

    def uniform_subnet(self, ratio: float) -> Subnet:
        """Every group at the same ratio (the uniform-rank baseline), which may lie outside a filtered space."""
        check_ratio(ratio)
        return {name: float(ratio) for name in self.group_names}

    def sample(self, rng: random.Random, weighted: bool = True) -> Subnet:
        """Draws one triple per block; `weighted` draws each with probability proportional to 1/prod(ratios)."""
        picks = []
        for index in range(len(self.blocks)):
            choices = self.choices(index)
            weights = [1.0 / math.prod(choice) for choice in choices] if weighted else None
            picks.append(rng.choices(choices, weights=weights)[0])
        return self.subnet_from_choices(picks)

    # model matching and persistence -------------------------------------------------------------------------
    def check_model(self, model: nn.Module) -> None:
        """Raises unless this space was made for a model with the same decomposable groups and shapes."""
        found = tuple(find_blocks(model))
        if found != self.blocks:
            theirs = {g.name: g for block in found for g in block}
            for group in self.groups:
                if theirs.get(group.name) != group:
                    raise SearchSpaceError(
                        f"search space does not match {type(model).__name__}: group {group.name} "
                        f"({group.in_features}->{group.out_features}) is {theirs.get(group.name) or 'absent'} there"
                    )
            raise SearchSpaceError(
                f"search space does not match {type(model).__name__}: it has {len(self.blocks)} blocks, "
                f"the model {len(found)}"
            )

    def to_dict(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "ratios": list(self.ratios),
            "blocks": [[{"name": g.name, "in": g.in_features, "out": g.out_features} for g in b] for b in self.blocks],
            "block_choices": None
            if self.block_choices is None
            else [[list(choice) for choice in choices] for choices in self.block_choices],
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> FloraSearchSpace:
        if not isinstance(data, Mapping) or data.get("format") != FORMAT_NAME:
            raise SearchSpaceError("not a flora-hf search space (missing 'format': 'flora-search-space')")
        if data.get("version") != FORMAT_VERSION:
            raise SearchSpaceError(
                f"search space format version {data.get('version')} is not supported (this flora-hf reads "
                f"version {FORMAT_VERSION})"
            )
        try:
            blocks = tuple(
                tuple(GroupShape(g["name"], int(g["in"]), int(g["out"])) for g in block) for block in data["blocks"]
            )
            choices = data.get("block_choices")
            return cls(blocks, tuple(data["ratios"]), None if choices is None else tuple(map(tuple, choices)))
        except (KeyError, TypeError) as error:
            raise SearchSpaceError(f"malformed search space: {error!r}") from error

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> FloraSearchSpace:
        try:
            data = read_json(path)
        except (OSError, ValueError) as error:
            raise SearchSpaceError(f"cannot read search space {path}: {error}") from error
        return cls.from_dict(data)
