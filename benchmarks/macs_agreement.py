"""Analytic MACs (`count_macs`) against torch's FLOP counter ÷ 2, on tiny and real-size configs (random weights).

    python -m benchmarks.macs_agreement [--quick]
"""

from __future__ import annotations

import argparse
import random

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

from flora_hf import FloraSupernetForImageClassification, count_macs  # noqa: E402

from .common import RESULTS, save_results  # noqa: E402

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
QUICK = ("tiny-vit", "tiny-swin", "DeiT-S")


def counted(model: torch.nn.Module) -> int:
    size = model.config.image_size
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(pixel_values=torch.zeros(1, 3, size, size))
    return counter.get_total_flops() // 2


def measure(name: str) -> list[dict]:
    model_class, config = CONFIGS[name]
    torch.manual_seed(0)
    dense = model_class(config).eval()
    dense.set_attn_implementation("eager")
    rows = [{"model": name, "subnet": "dense", "analytic": count_macs(dense), "flop_counter": counted(dense)}]
    supernet = FloraSupernetForImageClassification.from_dense(dense)
    for label, subnet in (("uniform 0.5", supernet.space.uniform_subnet(0.5)),
                          ("random", supernet.space.sample(random.Random(0)))):
        compact = supernet.export_subnet(subnet)
        compact.set_attn_implementation("eager")
        rows.append({"model": name, "subnet": label, "analytic": count_macs(supernet, subnet),
                     "flop_counter": counted(compact)})
    for row in rows:
        row["relative_error"] = row["analytic"] / row["flop_counter"] - 1
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny configs and DeiT-S only")
    names = QUICK if parser.parse_args().quick else tuple(CONFIGS)
    rows = [row for name in names for row in measure(name)]
    print(f"{'model':<10} {'subnet':<12} {'analytic GMACs':>15} {'counter GMACs':>14} {'error':>8}")
    for row in rows:
        print(f"{row['model']:<10} {row['subnet']:<12} {row['analytic'] / 1e9:>15.4f} "
              f"{row['flop_counter'] / 1e9:>14.4f} {row['relative_error']:>8.2%}")
    path = save_results("macs_agreement", rows)
    figure, axes = plt.subplots(figsize=(7, 4))
    labels = [f"{r['model']}\n{r['subnet']}" for r in rows]
    axes.bar(range(len(rows)), [100 * r["relative_error"] for r in rows])
    axes.axhline(1, color="red", linestyle=":")
    axes.axhline(-1, color="red", linestyle=":")
    axes.set(xticks=range(len(rows)), ylabel="analytic vs flop counter (%)", title="MACs agreement (±1% target)")
    axes.set_xticklabels(labels, fontsize=6, rotation=90)
    figure.tight_layout()
    figure.savefig(RESULTS / "macs_agreement.png", dpi=120)
    print(f"wrote {path} and {RESULTS / 'macs_agreement.png'}")


if __name__ == "__main__":
    main()
