"""SPViT as pipeline stages over a run directory: gate search, then the pruned model fine-tuned with distillation.

`flora-hf spvit-search RECIPE` runs these two stages alone; with `spvit.enabled: true`, `flora-hf run` runs them
first and FLORA decomposes the pruned model. As in SPViT, the pruned model is built from the *dense* weights
(convolutions re-made from the pretrained value / output projections, fresh BatchNorm) rather than from the
weights the search trained, and then fine-tuned.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from .checkpoints import load_compact
from .io import read_json, write_json
from .pipeline import SPVIT_MODEL_DIR, Run, _has_checkpoint
from .spvit import SPViTSupernetForImageClassification
from .spvit_trainer import SPViTTrainer, SPViTTrainingArguments

SEARCH_DIR = "spvit-search"
ARCHITECTURE_FILE = "architecture.json"
SEARCH_SETTINGS = ("macs_target", "macs_loss_weight", "gate_learning_rate")


def spvit_architecture(run: Run) -> dict[str, dict[str, Any]]:
    """Searches the gates of an SPViT supernet made from the dense model; the chosen architecture, saved as JSON."""
    saved = run.path(SEARCH_DIR, ARCHITECTURE_FILE)
    if saved.exists():
        return read_json(saved)
    settings = run.recipe["spvit"]
    supernet = _supernet(run)
    args = run.training_args(settings["search"], f"{SEARCH_DIR}-training", SPViTTrainingArguments,
                             **{key: settings[key] for key in SEARCH_SETTINGS})
    trainer = SPViTTrainer(model=supernet, args=args, train_dataset=run.datasets["train"],
                           eval_dataset=run.datasets["validation"])
    trainer.train(resume_from_checkpoint=_has_checkpoint(run.path(f"{SEARCH_DIR}-training")))
    architecture = supernet.eval().architecture()

    def save(tmp: Path) -> None:
        supernet.save_pretrained(tmp)
        write_json(tmp / ARCHITECTURE_FILE, architecture)

    run.save_directory(SEARCH_DIR, save)
    return architecture


def spvit_model(run: Run) -> PreTrainedModel:
    """The pruned model of the searched architecture, fine-tuned with distillation from the dense model."""
    if run.path(SPVIT_MODEL_DIR).exists():
        return load_compact(run.path(SPVIT_MODEL_DIR)).eval()
    architecture = spvit_architecture(run)
    compact = _supernet(run).export_pruned(architecture, image_processor=run.image_processor)
    settings = run.recipe["spvit"]
    return run.finetune_and_save(SPVIT_MODEL_DIR, compact, settings["finetune"], teacher=run.dense,
                                 search_settings={key: settings[key] for key in SEARCH_SETTINGS})


def run_spvit(run: Run) -> dict[str, Any]:
    """Runs (or resumes) the SPViT stages and writes `spvit_report.json`: dense vs pruned model."""
    report = {"dataset": run.recipe["dataset"], "dense": run.dense_entry,
              "spvit": {**run.entry(spvit_model(run)), "checkpoint": SPVIT_MODEL_DIR,
                        "architecture": spvit_architecture(run)["ops"]}}
    if run.state.is_main_process:
        write_json(run.path("spvit_report.json"), report)
    run.state.wait_for_everyone()
    return report


def _supernet(run: Run) -> SPViTSupernetForImageClassification:
    settings = run.recipe["spvit"]
    return SPViTSupernetForImageClassification.from_dense(run.dense, alpha=settings["alpha"],
                                                          gate_init=settings["gate_init"])
