"""What every benchmark records beside its numbers: the machine and software it ran on."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import torch
import transformers

RESULTS = Path(__file__).resolve().parent / "results"


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


def save_results(name: str, rows: list[dict]) -> Path:
    """Writes `results/<name>.json` ({"environment", "rows"}) and returns its path."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"environment": environment(), "rows": rows}, indent=2) + "\n")
    return path
