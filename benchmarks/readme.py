"""Regenerates the README's benchmark tables from the full results in `benchmarks/results/*.json`.

    python -m benchmarks.readme

Each table sits between `<!-- benchmark:NAME -->` and `<!-- /benchmark:NAME -->` and starts with the machine,
software, threads and date the results were measured with, so a table never outlives its numbers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from . import latency, macs_agreement, quality, scaling, train_step
from .common import RESULTS

README = Path(__file__).resolve().parent.parent / "README.md"
BENCHMARKS = (macs_agreement, latency, train_step, scaling, quality)


def provenance(environment: dict) -> str:
    return (f"*Measured {environment['date']} on {environment['cpu_count']} CPU cores ({environment['processor']}), "
            f"{environment['threads']} torch threads, torch {environment['torch']}, "
            f"transformers {environment['transformers']}.*")


def replace_block(content: str, name: str, text: str) -> str:
    start, end = f"<!-- benchmark:{name} -->", f"<!-- /benchmark:{name} -->"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(content):
        raise ValueError(f"README.md has no {start} ... {end} block")
    return pattern.sub(lambda _: f"{start}\n{text}\n{end}", content)


def main() -> None:
    content = README.read_text()
    for benchmark in BENCHMARKS:
        path = RESULTS / f"{benchmark.NAME}.json"
        if not path.exists():
            print(f"skipped {benchmark.NAME}: no {path.relative_to(README.parent)} (run python -m {benchmark.__name__})")
            continue
        data = json.loads(path.read_text())
        content = replace_block(content, benchmark.NAME, provenance(data["environment"]) + "\n\n"
                                + benchmark.markdown(data["rows"]))
    README.write_text(content)


if __name__ == "__main__":
    main()
