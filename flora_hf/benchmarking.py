"""Latency measurement shared by `flora-hf evaluate` and the benchmarks: warm-up, then the median of repeats."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


@torch.inference_mode()
def latency_ms(model: nn.Module, batch_size: int = 1, warmup: int = 3, repeats: int = 10) -> float:
    """Median wall-clock milliseconds of one forward pass on a random batch, on the model's device."""
    config = model.config
    size = config.image_size if isinstance(config.image_size, (tuple, list)) else (config.image_size,) * 2
    parameter = next(model.parameters())
    pixel_values = torch.randn(batch_size, config.num_channels, *size, device=parameter.device, dtype=parameter.dtype)
    was_training = model.training
    model.eval()
    timings = []
    for index in range(warmup + repeats):
        if parameter.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(pixel_values=pixel_values)
        if parameter.device.type == "cuda":
            torch.cuda.synchronize()
        if index >= warmup:
            timings.append((time.perf_counter() - start) * 1000)
    model.train(was_training)
    return statistics.median(timings)
