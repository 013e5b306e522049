"""Quality at equal MACs: FLORA against uniform ranks, random search and FLORA without each of its two ideas.

    python -m benchmarks.quality [--quick | --smoke] [--output-dir DIR] [--work-dir DIR]

Per dataset and seed, three `flora-hf run`s of recipes/digits.yaml, all from the same dense model:
- "FLORA": the recipe (filtered space, low-rank-aware sampling); its report also holds the uniform-rank
  baselines and random search at the same budgets;
- "no filtering": `filter.enabled=false`;
- "no low-rank-aware": `train_supernet.low_rank_aware=false` (subnets drawn uniformly).
Datasets: digits, and "shapes", ten classes of randomly placed, sized and rotated outlines and solids drawn here
and written in imagefolder layout. Runs live in the work directory and resume like any `flora-hf run`.

Headline: the MACs FLORA saves against uniform ranks at equal top-1 — for each FLORA subnet, the MACs the
uniform-rank curve (linear between its points) needs to reach the same accuracy.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from .common import markdown_table, parse_arguments, save_results  # noqa: E402

NAME = "quality"
ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "digits.yaml"
VARIANTS = {"FLORA": [], "no filtering": ["filter.enabled=false"],
            "no low-rank-aware": ["train_supernet.low_rank_aware=false"]}
SHORT = ["train_dense.num_train_epochs=20", "filter.training.num_train_epochs=1", "train_supernet.num_train_epochs=15",
         "search.generations=4", "finetune.num_train_epochs=3"]
MODES = {  # datasets, seeds, extra overrides
    "full": (("digits", "shapes"), (0, 1, 2), []),
    "quick": (("digits",), (0,), SHORT),
    "smoke": (("shapes",), (0,), [*SHORT, "train_dense.num_train_epochs=1", "train_supernet.num_train_epochs=1",
                                  "search.generations=1", "finetune.num_train_epochs=1", "search.budgets=[0.6]"]),
}
SHAPES = ("disc", "ring", "square", "frame", "triangle", "plus", "cross", "bars", "diamond", "dot pair")


def draw_shape(kind: str, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """One image of `kind`: random centre, scale, rotation and contrast, on a noisy background."""
    image = Image.new("L", (size, size), int(rng.integers(0, 60)))
    draw = ImageDraw.Draw(image)
    cx, cy = rng.uniform(0.35, 0.65, 2) * size
    r = rng.uniform(0.18, 0.3) * size
    ink, width = int(rng.integers(150, 256)), max(1, int(r / 3))
    angle = rng.uniform(-0.4, 0.4)

    def polygon(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in points]

    box = (cx - r, cy - r, cx + r, cy + r)
    square, diamond = [(-1, -1), (1, -1), (1, 1), (-1, 1)], [(0, -1), (1, 0), (0, 1), (-1, 0)]
    if kind == "disc":
        draw.ellipse(box, fill=ink)
    elif kind == "ring":
        draw.ellipse(box, outline=ink, width=width)
    elif kind in ("square", "frame", "triangle", "diamond"):
        points = polygon({"square": square, "frame": square, "triangle": [(0, -1), (1, 0.8), (-1, 0.8)],
                          "diamond": diamond}[kind])
        if kind == "frame":
            draw.line([*points, points[0]], fill=ink, width=width)
        else:
            draw.polygon(points, fill=ink)
    elif kind in ("plus", "cross"):
        arms = [(-1, 0), (1, 0), (0, -1), (0, 1)] if kind == "plus" else [(-1, -1), (1, 1), (-1, 1), (1, -1)]
        ends = polygon(arms)
        draw.line(ends[:2], fill=ink, width=width)
        draw.line(ends[2:], fill=ink, width=width)
    elif kind == "bars":
        for offset in (-0.5, 0.5):
            draw.line(polygon([(-1, offset), (1, offset)]), fill=ink, width=width)
    else:  # dot pair
        for x in (-0.6, 0.6):
            px, py = polygon([(x, 0)])[0]
            draw.ellipse((px - r / 3, py - r / 3, px + r / 3, py + r / 3), fill=ink)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 12, (size, size))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def write_shapes(directory: Path, per_class: int = 180, seed: int = 0) -> Path:
    """The shapes dataset in imagefolder layout (`<class>/<n>.png`); written once, reused after."""
    done = directory.with_name(f"{directory.name}.complete")
    if not done.exists():
        rng = np.random.default_rng(seed)
        for kind in SHAPES:
            (directory / kind).mkdir(parents=True, exist_ok=True)
            for index in range(per_class):
                draw_shape(kind, rng).save(directory / kind / f"{index}.png")
        done.touch()
    return directory


def flora_run(recipe_args: list[str], output_dir: Path) -> dict:
    """`flora-hf run` (resuming whatever exists in `output_dir`, its output in `<output_dir>.log`); its report."""
    command = [sys.executable, "-m", "flora_hf.cli", "run", str(RECIPE), "--output-dir", str(output_dir), *recipe_args]
    log = output_dir.with_name(f"{output_dir.name}.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as stream:
        if subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT).returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed; see {log}")
    return json.loads((output_dir / "report.json").read_text())


def runs(dataset: str, seed: int, overrides: list[str], work_dir: Path) -> list[dict]:
    """Rows of every variant's report for one dataset and seed."""
    source = str(write_shapes(work_dir / "data" / "shapes")) if dataset == "shapes" else dataset
    base = work_dir / dataset / f"seed{seed}"
    common = [f"dataset={source}", f"seed={seed}", *overrides]
    rows = []
    for variant, variant_overrides in VARIANTS.items():
        shared_dense = [] if variant == "FLORA" else [f"model.name_or_path={base / 'FLORA' / 'dense'}"]
        print(f"{dataset} seed {seed}: {variant}", flush=True)
        report = flora_run([*common, *shared_dense, *variant_overrides], base / variant)
        dense = report["dense"]
        row = {"dataset": dataset, "seed": seed, "dense_accuracy": dense["accuracy"], "dense_macs": dense["macs"]}
        for entry in report["flora"]:
            rows.append({**row, "method": variant, "budget": entry["max_macs"] / dense["macs"], **_point(entry, dense)})
        if variant == "FLORA":
            rows += [{**row, "method": "uniform", "ratio": entry["ratio"], **_point(entry, dense)}
                     for entry in report["uniform"]]
            rows += [{**row, "method": "random search", "budget": entry["max_macs"] / dense["macs"],
                      "macs_fraction": entry["macs"] / dense["macs"], "search_accuracy": entry["search_accuracy"]}
                     for entry in report["random"]]
    return rows


def _point(entry: dict, dense: dict) -> dict:
    return {"macs_fraction": entry["macs"] / dense["macs"], "accuracy": entry["accuracy"],
            "inherited_accuracy": entry.get("inherited_accuracy"), "search_accuracy": entry.get("search_accuracy")}


def uniform_macs_at(accuracy: float, uniform: list[tuple[float, float]]) -> float | None:
    """The least MACs fraction at which the uniform (MACs, accuracy) curve reaches `accuracy`; None if never."""
    points = sorted(uniform)
    if accuracy <= points[0][1]:
        return points[0][0]
    for (m0, a0), (m1, a1) in zip(points, points[1:]):
        if a0 < accuracy <= a1:
            return m0 + (m1 - m0) * (accuracy - a0) / (a1 - a0)
    return None


def summary(rows: list[dict]) -> list[dict]:
    """Mean ± std over seeds per (dataset, method, budget or ratio), with FLORA's MACs saving vs uniform."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (row["dataset"], row["method"], round(row.get("budget", row.get("ratio")), 3))
        groups.setdefault(key, []).append(row)
    lines = []
    for (dataset, method, point), members in groups.items():
        line = {"dataset": dataset, "method": method, "point": point, "seeds": len(members)}
        for metric in ("macs_fraction", "accuracy", "inherited_accuracy", "search_accuracy"):
            values = [m[metric] for m in members if m.get(metric) is not None]
            if values:
                line[metric] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        if method != "uniform" and "accuracy" in line:
            for metric in ("accuracy", "inherited_accuracy"):
                savings = [_saving(m, rows, metric) for m in members]
                known = [s for s in savings if s is not None]
                line[f"macs_saved_{metric}"] = (statistics.mean(known), len(known)) if known else (None, 0)
        lines.append(line)
    return lines


def _saving(member: dict, rows: list[dict], metric: str) -> float | None:
    """1 - FLORA MACs / uniform MACs at FLORA's `metric` in the same dataset and seed."""
    uniform = [(r["macs_fraction"], r[metric]) for r in rows if r["method"] == "uniform"
               and r["dataset"] == member["dataset"] and r["seed"] == member["seed"] and r.get(metric) is not None]
    needed = uniform_macs_at(member[metric], uniform) if uniform and member.get(metric) is not None else None
    return None if needed is None else 1 - member["macs_fraction"] / needed


def markdown(rows: list[dict]) -> str:
    def pm(value: tuple | None, percent: bool = False) -> str:
        if value is None:
            return "–"
        mean, std = value
        return f"{mean:.1%} ± {std:.1%}" if percent else f"{mean:.3f} ± {std:.3f}"

    def saved(value: tuple | None) -> str:
        return "–" if value is None or value[0] is None else f"{value[0]:+.0%} ({value[1]} seeds)"

    table = []
    for line in summary(rows):
        label = f"ratio {line['point']}" if line["method"] == "uniform" else f"≤{line['point']:.0%}"
        table.append([line["dataset"], line["method"], label, pm(line.get("macs_fraction"), True),
                      pm(line.get("accuracy")), pm(line.get("inherited_accuracy")), pm(line.get("search_accuracy")),
                      saved(line.get("macs_saved_accuracy")), saved(line.get("macs_saved_inherited_accuracy"))])
    headers = ["dataset", "method", "budget", "MACs", "top-1 (fine-tuned)", "top-1 (inherited)",
               "validation (search)", "MACs saved vs uniform, fine-tuned", "…, inherited"]
    return markdown_table(headers, table)


def plot(rows: list[dict], path: Path) -> None:
    datasets = list(dict.fromkeys(row["dataset"] for row in rows))
    figure, axes = plt.subplots(2, len(datasets), figsize=(5 * len(datasets), 7), squeeze=False)
    styles = {"uniform": "k.-", "FLORA": "ro", "no filtering": "bs", "no low-rank-aware": "g^"}
    summarized = summary(rows)
    for column, dataset in enumerate(datasets):
        lines = [line for line in summarized if line["dataset"] == dataset]
        for row_index, metric in enumerate(("accuracy", "inherited_accuracy")):
            ax = axes[row_index][column]
            for method, style in styles.items():
                points = sorted((line["macs_fraction"][0], *line[metric]) for line in lines
                                if line["method"] == method and metric in line)
                if points:
                    x, y, err = zip(*points)
                    ax.errorbar(x, y, yerr=err, fmt=style, label=method, capsize=3)
            dense = statistics.mean(r["dense_accuracy"] for r in rows if r["dataset"] == dataset)
            ax.axhline(dense, color="gray", linestyle=":", label="dense")
            ax.set(xlabel="MACs (fraction of dense)", ylabel=f"top-1, {metric.replace('_accuracy', '') or 'fine-tuned'}",
                   title=f"{dataset}: {'fine-tuned' if metric == 'accuracy' else 'inherited weights'}")
            ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    args = parse_arguments(__doc__.splitlines()[0], {"quick": "digits, one seed, short training (a few minutes)",
                                                     "smoke": "shapes, one seed, one epoch: checks the script runs"},
                           argv, timed=False, work_dir=ROOT / "runs" / "quality-benchmark")
    datasets, seeds, overrides = MODES[args.mode]
    work_dir = args.work_dir / args.mode
    rows = [row for dataset in datasets for seed in seeds for row in runs(dataset, seed, overrides, work_dir)]
    path = save_results(NAME, rows, args.output_dir, {"recipe": RECIPE.name, "datasets": datasets, "seeds": seeds,
                                                      "overrides": overrides, "variants": VARIANTS})
    plot(rows, args.output_dir / f"{NAME}.png")
    print(markdown(rows))
    print(f"wrote {path} and {args.output_dir / f'{NAME}.png'}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
