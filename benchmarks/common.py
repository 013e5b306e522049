"""What every benchmark shares: where results go, the machine they ran on, and their markdown tables."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers

RESULTS = Path(__file__).resolve().parent / "results"
QUICK_RESULTS = RESULTS / "quick"  # --quick / --smoke runs: never overwrite the full results the README shows


def environment() -> dict:
    return {
        "date": datetime.date.today().isoformat(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
    }


def save_results(name: str, rows: list[dict], directory: Path = RESULTS, settings: dict | None = None) -> Path:
    """Writes `<directory>/<name>.json` ({"environment", "settings", "rows"}) and returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    data = {"environment": environment(), "settings": settings or {}, "rows": rows}
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def parse_arguments(description: str, modes: dict[str, str], argv: list[str] | None = None, timed: bool = True,
                    work_dir: Path | None = None) -> argparse.Namespace:
    """The benchmarks' command line: `--quick` / `--smoke` (helps in `modes`), `--threads` (if `timed`),
    `--output-dir`, and `--work-dir` (if a default `work_dir` is given).

    `args.mode` is "full", "quick" or "smoke"; only full runs write to `RESULTS`, which the README shows.
    """
    parser = argparse.ArgumentParser(description=description)
    group = parser.add_mutually_exclusive_group()
    for mode, help_text in modes.items():
        group.add_argument(f"--{mode}", action="store_true", help=help_text)
    if timed:
        parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help=f"default: {RESULTS.name}/ for full runs, {RESULTS.name}/{QUICK_RESULTS.name}/ otherwise")
    if work_dir is not None:
        parser.add_argument("--work-dir", type=Path, default=work_dir, help=f"where runs go (default: {work_dir.name}/)")
    args = parser.parse_args(argv)
    args.mode = next((mode for mode in modes if getattr(args, mode)), "full")
    args.output_dir = args.output_dir or (RESULTS if args.mode == "full" else QUICK_RESULTS)
    return args
