"""What the timing benchmarks share: model sizes, subnets at a MACs fraction, interleaved timing."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from transformers import DeiTConfig, DeiTForImageClassification, PreTrainedModel, ViTConfig, ViTForImageClassification

from flora_hf import FloraSearchSpace, FloraSupernetForImageClassification, count_macs

SIZES: dict[str, tuple[type[PreTrainedModel], dict]] = {
    # the embedded digits default (recipes/digits.yaml)
    "tiny": (ViTForImageClassification, dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                             intermediate_size=128, image_size=16, patch_size=4, num_labels=10)),
    "DeiT-Ti": (DeiTForImageClassification, dict(hidden_size=192, num_attention_heads=3, intermediate_size=768,
                                                 num_labels=1000)),
    "DeiT-S": (DeiTForImageClassification, dict(hidden_size=384, num_attention_heads=6, intermediate_size=1536,
                                                num_labels=1000)),
}


def build(size: str, seed: int = 0, **overrides) -> PreTrainedModel:
    """A classifier of one of `SIZES` (config keys overridable) with random weights, in eval mode."""
    model_class, kwargs = SIZES[size]
    torch.manual_seed(seed)
    config_class = DeiTConfig if model_class is DeiTForImageClassification else ViTConfig
    return model_class(config_class(**{**kwargs, **overrides})).eval()


def pixel_batch(model: PreTrainedModel, batch: int, seed: int = 0) -> torch.Tensor:
    size = model.config.image_size
    return torch.randn(batch, model.config.num_channels, size, size, generator=torch.Generator().manual_seed(seed))


def synthetic_dataset(model: PreTrainedModel, size: int, seed: int = 0) -> list[dict]:
    """`size` random images with labels cycling through the model's classes, as Trainer items."""
    labels = torch.arange(size) % model.config.num_labels
    return [{"pixel_values": p, "labels": int(y)} for p, y in zip(pixel_batch(model, size, seed), labels)]


def subnet_at_fraction(supernet: FloraSupernetForImageClassification, fraction: float) -> dict[str, float]:
    """The subnet nearest `fraction` of the dense MACs among 'the first k blocks at one ratio, the rest at the next'.

    Uniform ratios reach only a few MACs fractions; moving one block at a time between two neighbouring ratios
    fills the gaps. Fractions below the smallest subnet give the smallest subnet.
    """
    space: FloraSearchSpace = supernet.space
    dense = count_macs(supernet, space.max_subnet())
    candidates = []
    for low, high in zip(space.ratios, space.ratios[1:]):
        for k in range(len(space.blocks) + 1):
            choices = [(low,) * 3] * k + [(high,) * 3] * (len(space.blocks) - k)
            subnet = space.subnet_from_choices(choices)
            candidates.append((abs(count_macs(supernet, subnet) / dense - fraction), subnet))
    return min(candidates, key=lambda item: item[0])[1]


def interleaved(functions: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, calling them in turn round after round.

    Interleaving puts every function under the same machine load, so their ratios hold on a shared machine
    even when absolute times drift.
    """
    for _ in range(warmup):
        for function in functions.values():
            function()
    seconds: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def median_ms(seconds: Sequence[float]) -> float:
    return 1000 * statistics.median(seconds)


def set_threads(threads: int | None) -> int:
    """Fixes torch's intra-op thread count (default: every core) and returns it."""
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def load_average() -> float | None:
    """1-minute load average: other work on the machine while the benchmark ran."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None
