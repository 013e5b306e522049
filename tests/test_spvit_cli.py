"""End-to-end: SPViT pruning and FLORA on the pruned model from the command line, on digits with tiny settings."""

import json

import torch
from test_cli import ROOT, TINY_OVERRIDES
from transformers import AutoModelForImageClassification

from flora_hf.cli import main

SPVIT_OVERRIDES = [
    "spvit.gate_learning_rate=0.05",
    "spvit.macs_target=0.9",
    "spvit.search={num_train_epochs: 2, per_device_train_batch_size: 64, lr_scheduler_type: constant}",
    "spvit.finetune={num_train_epochs: 1, per_device_train_batch_size: 64}",
    "search.budgets=[0.9]",  # of the pruned model, where FLORA decomposes only the blocks that kept attention
    "search.budget_window=0.3",
]


def test_spvit_search_then_flora_on_the_pruned_model(tmp_path, capsys):
    recipe = str(ROOT / "recipes" / "digits_spvit.yaml")
    output = tmp_path / "run"
    overrides = [*TINY_OVERRIDES, *SPVIT_OVERRIDES]
    assert main(["spvit-search", recipe, "--output-dir", str(output), *overrides]) == 0
    spvit_report = json.loads((output / "spvit_report.json").read_text())
    assert "SPViT" in capsys.readouterr().out
    pruned = spvit_report["spvit"]
    assert pruned["macs"] < spvit_report["dense"]["macs"] and 0 <= pruned["accuracy"] <= 1
    architecture = json.loads((output / "spvit-search" / "architecture.json").read_text())
    assert set(architecture["ops"].values()) <= {"msa", "conv3x3", "conv1x1", "skip"}
    assert "SPViT" in (output / "spvit" / "README.md").read_text()

    assert main(["run", recipe, "--output-dir", str(output), *overrides]) == 0  # reuses the pruned model
    report = json.loads((output / "report.json").read_text())
    assert report["spvit"]["macs"] == pruned["macs"]
    for entry in report["flora"]:
        assert entry["macs"] <= entry["max_macs"] < pruned["macs"]
        model = AutoModelForImageClassification.from_pretrained(output / entry["checkpoint"])
        assert model.config.spvit_ops == architecture["ops"] and model.config.flora_ranks
        with torch.no_grad():
            assert model(pixel_values=torch.zeros(1, 3, 16, 16)).logits.shape == (1, 10)
