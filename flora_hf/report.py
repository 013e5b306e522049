"""The run report: `report.json` (the public contract), `pareto.png`, `rank_map.png` and a printed table."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .io import atomic_path, write_json  # noqa: E402
from .search import SearchResult  # noqa: E402

GROUP_KINDS = ("qkv", "fc1", "fc2")


def write_report(report: dict[str, Any], searches: Sequence[SearchResult], output_dir: Path) -> None:
    """Writes report.json, pareto.png and rank_map.png into `output_dir`."""
    write_json(output_dir / "report.json", report)
    plot_pareto(report, searches, output_dir / "pareto.png")
    plot_rank_maps(report, output_dir / "rank_map.png")


def plot_pareto(report: dict[str, Any], searches: Sequence[SearchResult], path: Path) -> None:
    """Left: test top-1 vs MACs of dense, uniform and FLORA models. Right: what the search saw (validation)."""
    figure, (test_axes, search_axes) = plt.subplots(1, 2, figsize=(12, 4.5))
    dense = report["dense"]
    test_axes.scatter([dense["macs"] / 1e6], [dense["accuracy"]], marker="*", s=200, color="black", label="dense")
    if "spvit" in report:
        spvit = report["spvit"]
        test_axes.scatter([spvit["macs"] / 1e6], [spvit["accuracy"]], marker="D", s=80, color="tab:purple",
                          label="SPViT-pruned (FLORA's base)")
    uniform = sorted(report["uniform"], key=lambda e: e["macs"])
    test_axes.plot([e["macs"] / 1e6 for e in uniform], [e["accuracy"] for e in uniform], "o-", color="tab:gray",
                   label="uniform rank (fine-tuned)")
    test_axes.plot([e["macs"] / 1e6 for e in uniform], [e["inherited_accuracy"] for e in uniform], "o:",
                   color="tab:gray", alpha=0.6, markerfacecolor="none", label="uniform rank (supernet weights)")
    for entry in uniform:
        test_axes.annotate(f"{entry['ratio']:g}", (entry["macs"] / 1e6, entry["accuracy"]), fontsize=7,
                           textcoords="offset points", xytext=(3, -10))
    flora = sorted(report["flora"], key=lambda e: e["macs"])
    test_axes.plot([e["macs"] / 1e6 for e in flora], [e["accuracy"] for e in flora], "s-", color="tab:red",
                   label="FLORA (searched, fine-tuned)")
    test_axes.plot([e["macs"] / 1e6 for e in flora], [e["inherited_accuracy"] for e in flora], "s:", color="tab:red",
                   alpha=0.6, markerfacecolor="none", label="FLORA (supernet weights)")
    test_axes.set(xlabel="MACs per image (M)", ylabel="top-1 accuracy (test split)",
                  title=f"{report['dataset']}: accuracy vs cost")
    for result, entry in zip(searches, report["flora"]):
        front = result.pareto_front
        search_axes.scatter([c.macs / 1e6 for c in result.evaluated], [c.accuracy for c in result.evaluated],
                            s=6, alpha=0.3, color="tab:blue")
        search_axes.plot([c.macs / 1e6 for c in front], [c.accuracy for c in front], "-", color="tab:blue")
        search_axes.scatter([result.best.macs / 1e6], [result.best.accuracy], marker="s", color="tab:red")
        search_axes.axvline(entry["max_macs"] / 1e6, color="tab:red", alpha=0.2, linestyle=":")
    search_axes.plot([], [], "-o", color="tab:blue", markersize=3, label="evaluated subnets / Pareto front")
    search_axes.scatter([], [], marker="s", color="tab:red", label="best per budget")
    for entry in report.get("random", []):
        search_axes.scatter([entry["macs"] / 1e6], [entry["search_accuracy"]], marker="x", color="tab:green")
    search_axes.scatter([], [], marker="x", color="tab:green", label="random search best")
    search_axes.set(xlabel="MACs per image (M)", ylabel="top-1 (validation, inherited weights)",
                    title="evolutionary search")
    for axes in (test_axes, search_axes):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    _save_figure(figure, path)


def plot_rank_maps(report: dict[str, Any], path: Path) -> None:
    """Per FLORA subnet, the ratio of every block's qkv / fc1 / fc2 (darker = lower rank)."""
    entries = report["flora"]
    figure, axes_list = plt.subplots(1, len(entries), figsize=(2.4 * len(entries) + 1, 5), squeeze=False)
    for index, (axes, entry) in enumerate(zip(axes_list[0], entries)):
        groups = list(entry["subnet"])
        rows = [groups[i : i + 3] for i in range(0, len(groups), 3)]
        ratios = [[entry["subnet"][g] for g in row] for row in rows]
        image = axes.imshow(ratios, cmap="viridis", vmin=0, vmax=1, aspect="auto")
        for r, row in enumerate(ratios):
            for c, ratio in enumerate(row):
                axes.text(c, r, f"{ratio:g}", ha="center", va="center", fontsize=7,
                          color="white" if ratio < 0.6 else "black")
        axes.set(xticks=range(3), xticklabels=GROUP_KINDS, yticks=range(len(rows)), ylabel="block" if index == 0 else "",
                 title=f"≤{entry['max_macs'] / 1e6:.2f} M MACs\ntop-1 {entry['accuracy']:.3f}")
    figure.colorbar(image, ax=axes_list[0].tolist(), label="rank ratio")
    _save_figure(figure, path)


def format_table(report: dict[str, Any]) -> str:
    """A plain-text comparison table of dense, SPViT-pruned, uniform and FLORA models (those in the report)."""
    dense = report["dense"]
    rows = [("dense", dense)]
    rows += [("SPViT", report["spvit"])] if "spvit" in report else []
    rows += [(f"uniform {e['ratio']:g}", e) for e in report.get("uniform", [])]
    rows += [(f"FLORA ≤{e['max_macs'] / dense['macs']:.0%}", e) for e in report.get("flora", [])]
    lines = [f"{'model':<16} {'top-1':>7} {'inherited':>9} {'MACs (M)':>10} {'MACs %':>7} {'params':>10}"]
    for name, entry in rows:
        inherited = f"{entry['inherited_accuracy']:.4f}" if "inherited_accuracy" in entry else "-"
        lines.append(
            f"{name:<16} {entry['accuracy']:>7.4f} {inherited:>9} {entry['macs'] / 1e6:>10.3f} "
            f"{entry['macs'] / dense['macs']:>7.1%} {entry['params']:>10,}"
        )
    lines.append("top-1: test split, fine-tuned; inherited: the same subnet with supernet weights, before fine-tuning")
    return "\n".join(lines)


def _save_figure(figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=120, format="png")
    plt.close(figure)
