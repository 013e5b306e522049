"""Recipes: one YAML file describes a whole FLORA run; `key.sub=value` overrides change it from the command line.

Every section has defaults (below), so a recipe only states what differs. The training sections
(`train_dense`, `filter.training`, `train_supernet`, `finetune`, `spvit.finetune`) are `FloraTrainingArguments`
keyword arguments (`spvit.search`: `SPViTTrainingArguments`), passed through as they are.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .errors import FloraError


class RecipeError(FloraError):
    """A recipe file or override that cannot be used."""


DEFAULTS: dict[str, Any] = {
    "dataset": "digits",
    "seed": 0,
    "output_dir": None,
    "model": {
        "name_or_path": None,  # dense checkpoint dir or Hub id; None: build `config` and train it (train_dense)
        "architecture": "ViTForImageClassification",
        "config": {},
    },
    "data": {"validation_fraction": 0.2, "test_fraction": 0.2},
    "search_space": {"ratios": [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 1.0], "fold_singular_values": "down"},
    "train_dense": {},
    "filter": {
        "enabled": True,
        "train_fraction": 0.5,
        "keep_fraction": 0.3,
        "max_accuracy_drop": None,
        "flops_penalty": 0.1,
        "training": {},
    },
    "train_supernet": {},
    "search": {
        "budgets": [0.5],  # max MACs: fractions of the dense model's MACs (<= 1) or absolute MACs
        "budget_window": 0.1,  # min MACs = max MACs * (1 - window)
        "max_params": None,
        "population": 50,
        "parents": 10,
        "generations": 20,
        "mutations": 25,
        "crossovers": 25,
        "mutation_prob": 0.2,
        "batch_size": 256,
    },
    "spvit": {
        "enabled": False,  # run SPViT pruning first; FLORA then decomposes the pruned model
        "macs_target": 0.5,  # SPViT's MACs target, a fraction of the dense model's
        "macs_loss_weight": 20.0,
        "gate_learning_rate": 1e-3,
        "alpha": None,  # head-mixing temperature; None: the official one of the model family (DeiT 0.01, Swin 100)
        "gate_init": 1.5,
        "search": {},  # SPViTTrainingArguments of the gate search
        "finetune": {},  # FloraTrainingArguments of the pruned model's fine-tuning with distillation
    },
    "uniform": {"ratios": None},  # uniform-rank baselines; None: every ratio of the space below 1.0
    "finetune": {},
    "evaluate": {"batch_size": 256},
}

TRAINING_DEFAULTS = {"report_to": [], "save_strategy": "epoch", "save_total_limit": 1, "eval_strategy": "no",
                     "logging_steps": 20, "dataloader_num_workers": 0}


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Reads a recipe YAML, applies `key.sub=value` overrides (values parsed as YAML) and the defaults."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise RecipeError(f"cannot read recipe {path}: {error.strerror or error}") from error
    try:
        recipe = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise RecipeError(f"recipe {path} is not valid YAML: {error}") from error
    if not isinstance(recipe, Mapping):
        raise RecipeError(f"recipe {path} must be a mapping of sections, got {type(recipe).__name__}")
    for override in overrides:
        apply_override(recipe, override)
    return merge_defaults(recipe)


def apply_override(recipe: dict, override: str) -> None:
    """Sets `a.b.c=value` in place; the value is parsed as YAML (`x=0.5` is a float, `x=[1,2]` a list)."""
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise RecipeError(f"override {override!r} is not of the form key=value")
    *parents, leaf = key.split(".")
    node = recipe
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"override {override!r}: {part!r} is not a section")
    node[leaf] = yaml.safe_load(value)


def merge_defaults(recipe: Mapping) -> dict[str, Any]:
    """Recipe values over the defaults; unknown top-level sections are an error naming them."""
    unknown = sorted(set(recipe) - set(DEFAULTS))
    if unknown:
        raise RecipeError(f"unknown recipe section {unknown[0]!r}; known sections: {', '.join(DEFAULTS)}")
    merged = copy.deepcopy(DEFAULTS)
    for key, value in recipe.items():
        if isinstance(merged[key], dict) and key not in ("train_dense", "train_supernet", "finetune"):
            if not isinstance(value, Mapping):
                raise RecipeError(f"recipe section {key!r} must be a mapping")
            merged[key] = _merge(merged[key], value, key)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _merge(defaults: dict, values: Mapping, where: str) -> dict:
    merged = dict(defaults)
    for key, value in values.items():
        if key not in defaults:
            raise RecipeError(f"unknown key {where}.{key}; known: {', '.join(defaults)}")
        merged[key] = copy.deepcopy(value)
    return merged


def training_kwargs(recipe: Mapping, section: Mapping, output_dir: str | Path) -> dict[str, Any]:
    """`FloraTrainingArguments` keyword arguments of a training section, with the run's seed and output dir."""
    return {**TRAINING_DEFAULTS, "seed": recipe["seed"], **section, "output_dir": str(output_dir)}
