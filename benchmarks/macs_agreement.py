"""Analytic MACs (`count_macs`) against torch's FLOP counter ÷ 2, on tiny and real-size configs (random weights).

Rows: the dense model, two FLORA subnets and, for the real-size models, an SPViT-pruned model with the attention
ops of the released SPViT architecture of that family (`RELEASED_OPS`; every MLP at half width, standing in for the
released per-checkpoint MLP widths) and FLORA at ratio 1/2 on that pruned model.

    python -m benchmarks.macs_agreement [--quick | --smoke] [--output-dir DIR]
"""

from __future__ import annotations

import random
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from transformers import (  # noqa: E402
    DeiTConfig,
    DeiTForImageClassification,
    SwinConfig,
    SwinForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

from flora_hf import FloraSupernetForImageClassification, SPViTSupernetForImageClassification, count_macs  # noqa: E402
from flora_hf.modeling_spvit import SPVIT_OPS  # noqa: E402

from .common import markdown_table, parse_arguments, save_results  # noqa: E402

CONFIGS = {
    "tiny-vit": (ViTForImageClassification, ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                      intermediate_size=64, image_size=16, patch_size=4)),
    "tiny-swin": (SwinForImageClassification, SwinConfig(image_size=32, patch_size=2, embed_dim=16, depths=[1, 2],
                                                         num_heads=[2, 4], window_size=4)),
    "DeiT-S": (DeiTForImageClassification, DeiTConfig(hidden_size=384, num_attention_heads=6, intermediate_size=1536,
                                                      num_labels=1000)),
    "ViT-B/16": (ViTForImageClassification, ViTConfig(num_labels=1000)),
    "DeiT-B": (DeiTForImageClassification, DeiTConfig(num_labels=1000)),
    "Swin-T": (SwinForImageClassification, SwinConfig(num_labels=1000)),
    "Swin-B": (SwinForImageClassification, SwinConfig(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32],
                                                      num_labels=1000)),
}
DEIT_B_T60 = {0: "conv1x1", 1: "conv1x1", 2: "conv1x1", 3: "conv3x3", 4: "conv3x3"}
RELEASED_OPS = {  # layer index (counted across Swin stages) -> op; every other layer keeps its MSA
    "DeiT-S": {0: "conv1x1"},
    "ViT-B/16": DEIT_B_T60,
    "DeiT-B": DEIT_B_T60,
    "Swin-T": {0: "conv1x1", 1: "skip", 2: "conv1x1", 3: "skip"},
    "Swin-B": {1: "skip", 11: "skip", 18: "skip", 21: "skip", 19: "conv1x1"},
}
NAME = "macs_agreement"
MODES = {"full": tuple(CONFIGS), "quick": ("tiny-vit", "tiny-swin", "DeiT-S"), "smoke": ("tiny-vit", "tiny-swin")}


def counted(model: torch.nn.Module) -> int:
    """torch's FLOP counter ÷ 2 for one image, with eager attention (the counter does not see the CPU SDPA kernel)."""
    model.set_attn_implementation("eager")
    size = model.config.image_size
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(pixel_values=torch.zeros(1, 3, size, size))
    return counter.get_total_flops() // 2


def measure(name: str) -> list[dict]:
    model_class, config = CONFIGS[name]
    torch.manual_seed(0)
    dense = model_class(config).eval()

    def row(label: str, analytic: int, model: torch.nn.Module) -> dict:
        flop_counter = counted(model)
        return {"model": name, "subnet": label, "analytic": analytic, "flop_counter": flop_counter,
                "relative_error": analytic / flop_counter - 1}

    rows = [row("dense", count_macs(dense), dense)]
    supernet = FloraSupernetForImageClassification.from_dense(dense)
    for label, subnet in (("uniform 0.5", supernet.space.uniform_subnet(0.5)),
                          ("random", supernet.space.sample(random.Random(0)))):
        rows.append(row(label, count_macs(supernet, subnet), supernet.export_subnet(subnet)))
    if name in RELEASED_OPS:
        spvit = released_layout(SPViTSupernetForImageClassification.from_dense(dense), RELEASED_OPS[name])
        pruned = spvit.export_pruned()
        flora = FloraSupernetForImageClassification.from_dense(pruned)
        half = flora.space.uniform_subnet(0.5)
        rows += [row("SPViT", count_macs(spvit), pruned),
                 row("SPViT+FLORA 0.5", count_macs(flora, half), flora.export_subnet(half))]
    return rows


@torch.no_grad()
def released_layout(spvit: SPViTSupernetForImageClassification, ops: dict[int, str]) -> SPViTSupernetForImageClassification:
    """Gates set to `ops` (MSA elsewhere), every MLP keeping its first half of hidden units."""
    for index, (_, attention) in enumerate(spvit.search_attentions()):
        level = SPVIT_OPS.index(ops.get(index, "msa"))  # skip 0, conv1x1 1, conv3x3 2, msa 3: gates on below it
        attention.gate_logits.copy_(torch.tensor([1.0 if gate < level else -1.0 for gate in range(3)]))
    for _, activation in spvit.gated_activations():
        half = activation.gate_logits.numel() // 2
        activation.gate_logits[:half], activation.gate_logits[half:] = 1.0, -1.0
    return spvit.eval()


def run(mode: str, output_dir: Path) -> dict:
    rows = [row for name in MODES[mode] for row in measure(name)]
    path = save_results(NAME, rows, output_dir)
    plot(rows, output_dir / f"{NAME}.png")
    print(markdown(rows))
    print(f"wrote {path} and {output_dir / f'{NAME}.png'}")
    return {"rows": rows}


def plot(rows: list[dict], path: Path) -> None:
    figure, axes = plt.subplots(figsize=(7, 4))
    labels = [f"{r['model']}\n{r['subnet']}" for r in rows]
    axes.bar(range(len(rows)), [100 * r["relative_error"] for r in rows])
    axes.axhline(1, color="red", linestyle=":")
    axes.axhline(-1, color="red", linestyle=":")
    axes.set(xticks=range(len(rows)), ylabel="analytic vs flop counter (%)", title="MACs agreement (±1% target)")
    axes.set_xticklabels(labels, fontsize=6, rotation=90)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def markdown(rows: list[dict]) -> str:
    """One line per model: analytic GMACs of each measured model, and the largest error against the counter."""
    subnets = list(dict.fromkeys(row["subnet"] for row in rows))
    table = []
    for model in dict.fromkeys(row["model"] for row in rows):
        measured = {row["subnet"]: row for row in rows if row["model"] == model}
        table.append([model, *(f"{measured[s]['analytic'] / 1e9:.4f}" if s in measured else "–" for s in subnets),
                      f"{max(abs(row['relative_error']) for row in measured.values()):.2%}"])
    return markdown_table(["model", *(f"{s} GMACs" for s in subnets), "max error"], table)


def main(argv: list[str] | None = None) -> dict:
    args = parse_arguments(__doc__.splitlines()[0], {"quick": "tiny configs and DeiT-S", "smoke": "tiny configs"}, argv,
                           timed=False)
    return run(args.mode, args.output_dir)


if __name__ == "__main__":
    main()
