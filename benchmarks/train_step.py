"""Supernet training step against the dense model's step at the same batch, and their training memory.

    python -m benchmarks.train_step [--quick | --smoke] [--threads N] [--output-dir DIR]

A step is what `Trainer` does per optimizer step: `training_step` (forward, loss, backward) then the AdamW
update. The supernet step runs through `FloraTrainer` (a low-rank-aware sampled subnet per step, distillation
from the dense teacher's cached logits); the dense step through the stock `Trainer` (cross-entropy). A third
row trains the supernet's largest subnet (every ratio 1.0), which isolates the cost of the weight-sharing
layers from the cost of the subnets drawn. Steps of every row run in turn (see `harness.interleaved`); the
supernet's subnet changes from step to step, so rows report the mean over the same sequence of steps.

Memory: on CUDA the allocator's peak. On CPU, where no allocator keeps a peak, the two parts that scale with the
model: training state (parameters, gradients, AdamW moments) and the activations autograd saves for backward.
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import Trainer, TrainingArguments, default_data_collator  # noqa: E402

from flora_hf import FloraSupernetForImageClassification, FloraTrainer, FloraTrainingArguments  # noqa: E402

from .common import markdown_table, parse_arguments, save_results  # noqa: E402
from .harness import build, interleaved, load_average, set_threads, synthetic_dataset  # noqa: E402

NAME = "train_step"
MODES = {  # sizes, batch, timed steps per row
    "full": (("tiny", "DeiT-Ti", "DeiT-S"), 32, 12),
    "quick": (("tiny", "DeiT-Ti"), 32, 8),
    "smoke": (("tiny",), 8, 2),
}


def stepper(trainer: Trainer, batch: dict, advance: bool) -> Callable[[], None]:
    """One optimizer step of `trainer` on `batch`; `advance` moves `global_step` on (a new subnet per step)."""
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's own loop, which this bypasses

    def step() -> None:
        trainer.training_step(trainer.model, dict(batch))
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        if advance:
            trainer.state.global_step += 1
        if trainer.args.device.type == "cuda":
            torch.cuda.synchronize()

    return step


def trainers(size: str, batch: int, workdir: Path, device: str) -> dict[str, tuple[Trainer, dict, bool]]:
    """Row label -> (trainer, its batch, whether its subnet changes per step)."""
    dense = build(size).train()
    data = synthetic_dataset(dense, batch)
    common = dict(output_dir=str(workdir), per_device_train_batch_size=batch, learning_rate=1e-4, report_to=[],
                  use_cpu=device == "cpu", disable_tqdm=True)
    dense_trainer = Trainer(model=dense, args=TrainingArguments(**common), data_collator=default_data_collator)
    rows = {"dense": (dense_trainer, default_data_collator(data), False)}
    for label, largest_only in (("supernet, sampled subnet", False), ("supernet, largest subnet", True)):
        supernet = FloraSupernetForImageClassification.from_dense(dense)
        blocks = len(supernet.space.blocks)
        one_subnet = supernet.space.with_block_choices([[(1.0, 1.0, 1.0)]] * blocks) if largest_only else None
        args = FloraTrainingArguments(**common, low_rank_aware=True, distillation_alpha=1.0)
        trainer = FloraTrainer(model=supernet, args=args, teacher=build(size), train_dataset=data, search_space=one_subnet)
        items = trainer.train_dataset.__getitems__(list(range(batch)))
        rows[label] = (trainer, trainer.data_collator(items), True)
    return rows


def state_bytes(trainer: Trainer) -> int:
    """Parameters, their gradients and AdamW's two moments: four copies of every trainable parameter."""
    return 4 * sum(p.numel() * p.element_size() for p in trainer.model.parameters() if p.requires_grad)


def saved_activation_bytes(step: Callable[[], None], model: nn.Module) -> int:
    """Bytes autograd saves for backward during one step, not counting the parameters themselves."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(storages.values())


def measure(size: str, batch: int, steps: int, device: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as workdir:
        rows_trainers = trainers(size, batch, Path(workdir), device)
        steppers = {label: stepper(t, b, advance) for label, (t, b, advance) in rows_trainers.items()}
        memory = {}
        for label, step in steppers.items():
            trainer = rows_trainers[label][0]
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                step()
                memory[label] = {"peak_bytes": torch.cuda.max_memory_allocated()}
            else:
                memory[label] = {"state_bytes": state_bytes(trainer),
                                 "activation_bytes": saved_activation_bytes(step, trainer.model)}
        seconds = interleaved(steppers, steps, warmup=1)
    dense_ms = 1000 * statistics.mean(seconds["dense"])
    rows = []
    for label, runs in seconds.items():
        mean_ms = 1000 * statistics.mean(runs)
        ratios = {key.replace("bytes", "ratio"): value / memory["dense"][key] for key, value in memory[label].items()}
        rows.append({"model": size, "row": label, "batch": batch, "device": device, "runs_ms": [1000 * s for s in runs],
                     "mean_ms": mean_ms, "ratio_to_dense": mean_ms / dense_ms, **memory[label], **ratios})
    return rows


def run(mode: str, threads: int | None, output_dir: Path) -> dict:
    sizes, batch, steps = MODES[mode]
    threads = set_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = {"threads": threads, "batch": batch, "timed_steps": steps, "device": device,
                "load_average_start": load_average()}
    rows = [row for size in sizes for row in measure(size, batch, steps, device)]
    settings["load_average_end"] = load_average()
    path = save_results(NAME, rows, output_dir, settings)
    plot(rows, output_dir / f"{NAME}.png")
    print(markdown(rows))
    print(f"wrote {path} and {output_dir / f'{NAME}.png'}")
    return {"settings": settings, "rows": rows}


def plot(rows: list[dict], path: Path) -> None:
    sizes = list(dict.fromkeys(row["model"] for row in rows))
    labels = list(dict.fromkeys(row["row"] for row in rows))
    figure, axes = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(labels)
    for offset, label in enumerate(labels):
        values = [next(r["ratio_to_dense"] for r in rows if r["model"] == s and r["row"] == label) for s in sizes]
        axes.bar([i + offset * width for i in range(len(sizes))], values, width, label=label)
    axes.axhline(1.3, color="k", linestyle=":", label="target 1.3×")
    axes.set_xticks([i + width * (len(labels) - 1) / 2 for i in range(len(sizes))], sizes)
    axes.set(ylabel="step time / dense step time", title=f"training step, batch {rows[0]['batch']}, {rows[0]['device']}")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def megabytes(value: int | None) -> str:
    return "–" if value is None else f"{value / 2**20:.1f}"


def markdown(rows: list[dict]) -> str:
    table = [[row["model"], row["row"], f"{row['mean_ms']:.1f}", f"{row['ratio_to_dense']:.2f}×",
              megabytes(row.get("state_bytes")), megabytes(row.get("activation_bytes")), megabytes(row.get("peak_bytes"))]
             for row in rows]
    headers = ["model", "step", "mean ms", "vs dense", "state MB", "saved activations MB", "CUDA peak MB"]
    return markdown_table(headers, table)


def main(argv: list[str] | None = None) -> dict:
    args = parse_arguments(__doc__.splitlines()[0], {"quick": "tiny and DeiT-Ti (a few minutes)", "smoke": "the tiny ViT, two steps: checks the script runs"}, argv)
    return run(args.mode, args.threads, args.output_dir)


if __name__ == "__main__":
    main()
