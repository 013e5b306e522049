"""How supernet training and search time grow with the model size and with the number of processes.

    python -m benchmarks.scaling [--quick | --smoke] [--output-dir DIR]

Each measurement is one fresh process (or two, under `accelerate launch --multi_gpu --num_processes 2` on CPU)
running the real stages on random-weight models and synthetic images: `FloraTrainer.train` for a few steps
(a sampled subnet per step, distillation from cached teacher logits) and `evolutionary_search` in the middle of
the MACs range. Two processes split the same work: the global batch stays the same (each process takes half)
and search candidates are shared out; the machine's cores are split between them (one torch thread each on 2
cores). Reported: seconds per optimizer step and per evaluated candidate, and, for processes, the speed-up of 2
over 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from flora_hf import FloraSupernetForImageClassification, FloraTrainer, FloraTrainingArguments  # noqa: E402
from flora_hf import count_macs, evolutionary_search  # noqa: E402

from .common import markdown_table, parse_arguments, save_results  # noqa: E402
from .harness import build, synthetic_dataset  # noqa: E402

NAME = "scaling"
BATCH = 32
MODES = {  # sizes, size of the processes comparison, training steps, search generations, search images
    "full": (("tiny", "DeiT-Ti", "DeiT-S"), "DeiT-Ti", 6, 2, 64),
    "quick": (("tiny", "DeiT-Ti"), "tiny", 4, 1, 32),
    "smoke": (("tiny",), "tiny", 2, 1, 16),
}
SEARCH = dict(population=8, parents=4, mutations=4, crossovers=4, batch_size=BATCH, progress=False)


def work(size: str, steps: int, generations: int, search_images: int) -> dict | None:
    """Times training and search in this process (one of several under `accelerate launch`); rank 0's times."""
    from accelerate import PartialState

    state = PartialState(cpu=True)
    dense = build(size).train()
    supernet = FloraSupernetForImageClassification.from_dense(dense)
    with tempfile.TemporaryDirectory() as workdir:
        args = FloraTrainingArguments(output_dir=workdir, per_device_train_batch_size=BATCH // state.num_processes,
                                      max_steps=1, learning_rate=1e-4, use_cpu=True, report_to=[],
                                      save_strategy="no", disable_tqdm=True, dataloader_drop_last=True)
        trainer = FloraTrainer(model=supernet, args=args, teacher=build(size),
                               train_dataset=synthetic_dataset(dense, BATCH * steps))
        trainer.train()  # one step outside the timing: one-time set-up of the loop and the allocator
        trainer.args.max_steps = steps
        start = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - start
    supernet.eval()
    low, high = count_macs(supernet, supernet.space.min_subnet()), count_macs(supernet, supernet.space.max_subnet())
    start = time.perf_counter()
    result = evolutionary_search(supernet, synthetic_dataset(dense, search_images, seed=1), generations=generations,
                                 min_macs=low + (high - low) // 4, max_macs=low + 3 * (high - low) // 4, **SEARCH)
    search_seconds = time.perf_counter() - start
    if not state.is_main_process:
        return None
    return {"model": size, "processes": state.num_processes, "threads_per_process": torch.get_num_threads(),
            "step_seconds": train_seconds / steps, "candidates": len(result.evaluated),
            "candidate_seconds": search_seconds / len(result.evaluated)}


def launch(size: str, processes: int, mode: str, output: Path) -> dict:
    """Runs `work` in fresh processes (1: plain python with every core; 2: accelerate launch, cores split)."""
    worker = ["-m", "benchmarks.scaling", "--worker", size, mode, str(output)]
    cores = os.cpu_count() or 1
    if processes == 1:
        command, threads = [sys.executable, *worker], cores
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--main_process_port", "29541", *worker]
        threads = max(1, cores // processes)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(command, check=True, env=env, cwd=Path(__file__).resolve().parent.parent,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return json.loads(output.read_text())


def run(mode: str, output_dir: Path) -> dict:
    sizes, process_size, *_ = MODES[mode]
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for index, (size, processes) in enumerate([(s, 1) for s in sizes] + [(process_size, 2)]):
            print(f"{size}, {processes} process(es)", flush=True)
            rows.append(launch(size, processes, mode, Path(workdir) / f"{index}.json"))
    single = next(r for r in rows if r["model"] == process_size and r["processes"] == 1)
    for row in rows:
        row["step_speedup_vs_1_process"] = single["step_seconds"] / row["step_seconds"] if row["model"] == process_size else None
        row["search_speedup_vs_1_process"] = (single["candidate_seconds"] / row["candidate_seconds"]
                                              if row["model"] == process_size else None)
    path = save_results(NAME, rows, output_dir, {"mode": mode, "batch": BATCH, "search": SEARCH})
    plot(rows, output_dir / f"{NAME}.png")
    print(markdown(rows))
    print(f"wrote {path} and {output_dir / f'{NAME}.png'}")
    return {"rows": rows}


def plot(rows: list[dict], path: Path) -> None:
    single = [r for r in rows if r["processes"] == 1]
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, label in ((axes[0], "step_seconds", "s per training step"),
                           (axes[1], "candidate_seconds", "s per search candidate")):
        ax.bar([r["model"] for r in single], [r[key] for r in single], label="1 process")
        for r in rows:
            if r["processes"] > 1:
                ax.plot([r["model"]], [r[key]], "r^", label=f"{r['processes']} processes")
        ax.set(ylabel=label, yscale="log")
        ax.legend(fontsize=7)
    figure.suptitle(f"supernet training (batch {BATCH}) and search, CPU")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def markdown(rows: list[dict]) -> str:
    def speedup(value: float | None) -> str:
        return "–" if value is None else f"{value:.2f}×"

    table = [[r["model"], r["processes"], r["threads_per_process"], f"{r['step_seconds']:.3f}",
              f"{r['candidate_seconds']:.3f}", speedup(r["step_speedup_vs_1_process"]),
              speedup(r["search_speedup_vs_1_process"])] for r in rows]
    headers = ["model", "processes", "threads each", "s / training step", "s / search candidate",
               "training speed-up", "search speed-up"]
    return markdown_table(headers, table)


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:  # one measurement, in a process launched by `launch`
        size, mode, output = argv[1:]
        _, _, steps, generations, search_images = MODES[mode]
        row = work(size, steps, generations, search_images)
        if row is not None:
            Path(output).write_text(json.dumps(row))
        return row
    args = parse_arguments(__doc__.splitlines()[0], {"quick": "tiny and DeiT-Ti (a few minutes)",
                                                     "smoke": "the tiny ViT: checks the script runs"}, argv, timed=False)
    return run(args.mode, args.output_dir)


if __name__ == "__main__":
    main()
