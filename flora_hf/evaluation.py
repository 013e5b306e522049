"""Top-k accuracy of an image classifier on a dataset of `{"pixel_values", "labels"}` items.

Search calls this thousands of times, so it is one plain inference loop: no metrics library, no Trainer.
With several processes each evaluates a strided shard and the correct counts are summed, so the result is
exactly the single-process one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from accelerate.utils import gather_object
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from .data import DataError, collate_image_batch


PRELOAD_LIMIT_BYTES = 2**30


class PreloadedDataset(Dataset):
    """An evaluation split collated once into batches and kept in memory.

    Search and filtering evaluate thousands of subnets on the same images; collating them once removes the
    per-evaluation data-loading cost. Splits larger than `limit_bytes` are not preloaded (see `maybe_preload`).
    """

    def __init__(self, dataset: Dataset, batch_size: int) -> None:
        self.batch_size = batch_size
        self.batches = list(DataLoader(dataset, batch_size=batch_size, collate_fn=collate_image_batch))
        self.length = len(dataset)

    def __len__(self) -> int:
        return self.length


def maybe_preload(dataset: Dataset, batch_size: int, limit_bytes: int = PRELOAD_LIMIT_BYTES) -> Dataset:
    """`dataset` preloaded when its pixels fit in `limit_bytes`, else as it is (streamed at every evaluation)."""
    if len(dataset) == 0:
        return dataset
    item_bytes = dataset[0]["pixel_values"].element_size() * dataset[0]["pixel_values"].numel()
    return PreloadedDataset(dataset, batch_size) if item_bytes * len(dataset) <= limit_bytes else dataset


def process_layout(accelerator=None) -> tuple[int, int]:
    """(index of this process, number of processes), from `accelerator` or an initialized torch.distributed."""
    if accelerator is not None:
        return accelerator.process_index, accelerator.num_processes
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.inference_mode()
def count_correct(
    model: nn.Module, dataset: Dataset, *, batch_size: int = 256, top_k: Sequence[int] = (1,), progress: bool = False
) -> tuple[torch.Tensor, int]:
    """Per k of `top_k`, how many items have their label among the k best logits; and how many items there are.

    k is clipped to the number of classes. The model runs in eval mode; its previous mode is restored.
    """
    parameter = next(model.parameters())
    was_training = model.training
    model.eval()
    correct = torch.zeros(len(top_k), dtype=torch.long, device=parameter.device)
    total = 0
    if isinstance(dataset, PreloadedDataset):
        loader = dataset.batches
    else:
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_image_batch)
    try:
        for batch in tqdm(loader, desc="evaluating", disable=not progress, leave=False):
            labels = batch["labels"].to(parameter.device)
            logits = model(pixel_values=batch["pixel_values"].to(parameter.device, parameter.dtype)).logits
            best = logits.topk(min(max(top_k), logits.shape[-1]), dim=-1).indices
            hits = best == labels[:, None]
            correct += torch.stack([hits[:, :k].any(dim=-1).sum() for k in top_k])
            total += labels.numel()
    finally:
        model.train(was_training)
    return correct, total


def evaluate_accuracy(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    top_k: Sequence[int] = (1, 5),
    accelerator=None,
    progress: bool = False,
) -> dict[str, float]:
    """`{"top1": ..., "top5": ...}` (one `top{k}` per k, in [0, 1]) of `model` on `dataset`, on the model's device.

    With an `accelerate.Accelerator` of several processes (or an initialized torch.distributed) every process
    must call this; each evaluates items `index::num_processes` and all get the same totals.
    """
    index, count = process_layout(accelerator)
    shard = dataset if count == 1 else Subset(dataset, range(index, len(dataset), count))
    correct, total = count_correct(
        model, shard, batch_size=batch_size, top_k=top_k, progress=progress and index == 0
    )
    if count > 1:
        counts = torch.cat([correct, correct.new_tensor([total])])
        if accelerator is not None:
            counts = accelerator.reduce(counts, reduction="sum")
        else:
            dist.all_reduce(counts)
        correct, total = counts[:-1], int(counts[-1])
    if total == 0:
        raise DataError("cannot measure accuracy on an empty dataset")
    return {f"top{k}": hits / total for k, hits in zip(top_k, correct.tolist())}


def evaluate_subnets(
    supernet: nn.Module,
    subnets: Sequence[Mapping[str, float]],
    dataset: Dataset,
    *,
    batch_size: int = 256,
    accelerator=None,
    description: str = "evaluating subnets",
    progress: bool = True,
) -> list[float]:
    """Top-1 of a supernet at each of `subnets` on the whole `dataset`, in order.

    With several processes each evaluates its share of the subnets and all gather every accuracy, so all
    processes return the same list. The supernet's active subnet is restored afterwards.
    """
    index, count = process_layout(accelerator)
    previous = supernet.active_subnet
    mine = []
    try:
        for position in tqdm(range(index, len(subnets), count), desc=description, disable=not progress or index != 0):
            supernet.set_subnet(subnets[position])
            correct, total = count_correct(supernet, dataset, batch_size=batch_size)
            if total == 0:
                raise DataError("cannot measure accuracy on an empty dataset")
            mine.append((position, int(correct[0]) / total))
    finally:
        if previous is not None:
            supernet.set_subnet(previous)
    gathered = mine if count == 1 else _gather(mine, accelerator)
    return [accuracy for _, accuracy in sorted(gathered)]


def _gather(items: list, accelerator) -> list:
    """Every process's `items`, concatenated, on every process."""
    if accelerator is not None:
        return gather_object(items)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]
