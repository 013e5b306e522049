"""SPViTTrainer: `transformers.Trainer` that searches an SPViT supernet's gates under a MACs target.

The loss is SPViT's: cross-entropy on labels plus `weight * ((MACs - target) / dense MACs)^2`, where MACs is the
cost of the architecture the gates choose now (straight-through in the gate logits). There is no distillation
during the search (as in SPViT). Gate logits train with their own learning rate and no weight decay, the other
weights with the stock settings; weight decay skips 1-D parameters, as the official code does. Everything else
(schedule, checkpointing, logging, resume, `accelerate`) is the stock Trainer's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainingArguments, default_data_collator

from .spvit import SPViTSupernetForImageClassification
from .trainer import accuracy_metrics

GATE_PARAMETER = "gate_logits"


@dataclass
class SPViTTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus SPViT's search options."""

    macs_target: float = field(default=0.5, metadata={"help": "Target MACs as a fraction of the dense model's."})
    macs_loss_weight: float = field(
        default=20.0,
        metadata={"help": "Weight of ((MACs - target) / dense MACs)^2. The official weights, stated on GMACs, "
                          "convert as weight = official * (dense GMACs)^2 (DeiT-B: 0.06 * 17.5^2 = 18)."},
    )
    gate_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of the gate logits."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept off: image datasets transform their `image` column on access."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.macs_target <= 1.0:
            raise ValueError(f"macs_target must be a fraction of the dense MACs in (0, 1], got {self.macs_target}")
        if self.macs_loss_weight < 0:
            raise ValueError(f"macs_loss_weight must be non-negative, got {self.macs_loss_weight}")
        if self.gate_learning_rate <= 0:
            raise ValueError(f"gate_learning_rate must be positive, got {self.gate_learning_rate}")


class SPViTTrainer(Trainer):
    """Trains an `SPViTSupernetForImageClassification`'s weights and gates; logs the chosen architecture's MACs.

    The gate samples of step s are drawn from a generator seeded with (seed, s), so every process samples the
    same architecture and a resumed run continues the same sequence.
    """

    def __init__(self, model: SPViTSupernetForImageClassification, args: SPViTTrainingArguments, **kwargs) -> None:
        if not isinstance(model, SPViTSupernetForImageClassification):
            raise TypeError(f"SPViTTrainer trains an SPViTSupernetForImageClassification, got {type(model).__name__}")
        kwargs.setdefault("data_collator", default_data_collator)
        kwargs.setdefault("compute_metrics", accuracy_metrics)
        super().__init__(model=model, args=args, **kwargs)
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self._macs_loss = 0.0

    def create_optimizer(self):
        if self.optimizer is None:
            groups: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": [], "gates": []}
            for name, parameter in self.model.named_parameters():
                if not parameter.requires_grad:
                    continue
                group = "gates" if name.endswith(GATE_PARAMETER) else "decay" if parameter.ndim > 1 else "no_decay"
                groups[group].append(parameter)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            self.optimizer = optimizer_cls([
                {"params": groups["decay"], "weight_decay": self.args.weight_decay},
                {"params": groups["no_decay"], "weight_decay": 0.0},
                {"params": groups["gates"], "weight_decay": 0.0, "lr": self.args.gate_learning_rate},
            ], **optimizer_kwargs)
        return self.optimizer

    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        self.model.gate_seed = self.args.seed * 1_000_003 + self.state.global_step
        return super().training_step(model, inputs, num_items_in_batch)

    def macs_loss(self) -> torch.Tensor:
        """`weight * ((MACs of the chosen architecture - target) / dense MACs)^2`, differentiable in the gates."""
        dense = self.model.config.dense_macs
        return self.args.macs_loss_weight * ((self.model.macs(soft=True) - self.args.macs_target * dense) / dense) ** 2

    def compute_loss(self, model: nn.Module, inputs: dict, return_outputs: bool = False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = F.cross_entropy(outputs.logits, labels, label_smoothing=self.args.label_smoothing_factor)
        if model.training:
            macs_loss = self.macs_loss()
            self._macs_loss = macs_loss.item()
            loss = loss + macs_loss
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Training logs also carry the MACs loss and the chosen architecture's MACs / dense MACs."""
        if "loss" in logs:
            logs["macs_loss"] = round(self._macs_loss, 6)
            logs["macs_fraction"] = round(self.model.count_macs() / self.model.config.dense_macs, 4)
        super().log(logs, start_time)
