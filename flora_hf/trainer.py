"""FloraTrainer: `transformers.Trainer` that trains one sampled subnet of the supernet per optimizer step.

Everything else (optimizer, schedule, checkpointing, logging, progress bars, `resume_from_checkpoint`,
`accelerate` integration) is the stock Trainer's. The subnet of step s is drawn from a generator seeded with
(seed, s): every process draws the same subnet and a resumed run continues the same sequence.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset
from transformers import EvalPrediction, Trainer, TrainingArguments, default_data_collator

from .io import atomic_path
from .search_space import FloraSearchSpace, Subnet
from .supernet import FloraSupernetForImageClassification

SAMPLE_INDEX = "sample_index"
TEACHER_LOGITS_FILE = "teacher_logits.safetensors"


@dataclass
class FloraTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus FLORA's supernet-training options."""

    low_rank_aware: bool = field(
        default=True,
        metadata={"help": "Draw each block's (qkv, fc1, fc2) ratios with probability ∝ 1/prod(ratios); False: uniform."},
    )
    distillation_alpha: float = field(
        default=1.0, metadata={"help": "Weight of the distillation loss; 1 - alpha goes to cross-entropy on labels."}
    )
    distillation_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of distillation."})
    cache_teacher_logits: bool = field(
        default=True,
        metadata={
            "help": "Run the teacher once over the train set and reuse its logits (saved to output_dir as "
            "safetensors), as the official recipe does; needs deterministic preprocessing. False: online teacher."
        },
    )
    eval_subnets: str = field(
        default="min,max",
        metadata={"help": "Subnets evaluated at each evaluation: comma-separated 'min', 'max' or 'uniform:<ratio>'."},
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept off: image datasets transform their `image` column on access."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.distillation_alpha <= 1.0:
            raise ValueError(f"distillation_alpha must be in [0, 1], got {self.distillation_alpha}")
        if self.distillation_temperature <= 0:
            raise ValueError(f"distillation_temperature must be positive, got {self.distillation_temperature}")


class IndexedDataset(Dataset):
    """Adds each item's position, so cached teacher logits can be looked up per sample."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], SAMPLE_INDEX: index}

    def __getitems__(self, indices: list[int]) -> list[dict]:
        # batched fetching keeps `datasets`' fast path (one Arrow read per batch instead of one per item)
        getitems = getattr(self.dataset, "__getitems__", None)
        items = getitems(indices) if getitems is not None else [self.dataset[i] for i in indices]
        return [{**item, SAMPLE_INDEX: index} for item, index in zip(items, indices)]


def accuracy_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """Top-1 accuracy of logits against labels (the default `compute_metrics`)."""
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(prediction.label_ids)).mean())}


def subnet_for_step(space: FloraSearchSpace, seed: int, step: int, low_rank_aware: bool) -> Subnet:
    """The subnet of optimizer step `step`: a pure function of (seed, step), so identical on every process."""
    return space.sample(random.Random(seed * 1_000_003 + step), weighted=low_rank_aware)


class DistillationTrainer(Trainer):
    """`Trainer` whose loss distills from a teacher: alpha * KD + (1 - alpha) * cross-entropy on labels.

    Used as is to fine-tune exported compact models, and as FloraTrainer's base for the supernet.

    Args:
        teacher: the dense model to distill from; None trains with cross-entropy only.
        Other arguments are `transformers.Trainer`'s.
    """

    def __init__(self, model: nn.Module, args: FloraTrainingArguments, teacher: nn.Module | None = None, **kwargs) -> None:
        kwargs.setdefault("data_collator", default_data_collator)
        kwargs.setdefault("compute_metrics", accuracy_metrics)
        self.teacher = teacher
        self.teacher_logits: torch.Tensor | None = None
        train_dataset = kwargs.get("train_dataset")
        if teacher is not None and args.cache_teacher_logits and train_dataset is not None:
            kwargs["train_dataset"] = IndexedDataset(train_dataset)
        super().__init__(model=model, args=args, **kwargs)
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        if teacher is not None:
            teacher.requires_grad_(False).eval().to(self.args.device)
            if args.cache_teacher_logits and train_dataset is not None:
                self.teacher_logits = self._cached_teacher_logits(train_dataset)

    # loss ---------------------------------------------------------------------------------------------------
    def compute_loss(self, model: nn.Module, inputs: dict, return_outputs: bool = False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        sample_index = inputs.pop(SAMPLE_INDEX, None)
        outputs = model(**inputs)
        loss = F.cross_entropy(outputs.logits, labels, label_smoothing=self.args.label_smoothing_factor)
        if self.teacher is not None and model.training and self.args.distillation_alpha > 0:
            teacher_logits = self._teacher_logits(inputs["pixel_values"], sample_index)
            distillation = distillation_loss(outputs.logits, teacher_logits, self.args.distillation_temperature)
            alpha = self.args.distillation_alpha
            loss = alpha * distillation + (1 - alpha) * loss
        return (loss, outputs) if return_outputs else loss

    def _teacher_logits(self, pixel_values: torch.Tensor, sample_index: torch.Tensor | None) -> torch.Tensor:
        if self.teacher_logits is not None and sample_index is not None:
            return self.teacher_logits[sample_index.cpu()].to(pixel_values.device)
        with torch.no_grad():
            return self.teacher(pixel_values=pixel_values).logits

    @torch.no_grad()
    def _cached_teacher_logits(self, dataset: Dataset) -> torch.Tensor:
        """Teacher logits of every train item, computed once (main process first) and stored as safetensors.

        A stored file is reused only if it has one row per item and its first batch matches the teacher's
        logits now, so a file left by another teacher or dataset is recomputed rather than trusted.
        """
        path = Path(self.args.output_dir) / TEACHER_LOGITS_FILE
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=self.args.per_device_eval_batch_size, collate_fn=self.data_collator
        )
        batches = iter(loader)
        first = self._teacher_batch(next(batches))
        with self.args.main_process_first(desc="caching teacher logits"):
            if path.exists():
                logits = load_file(path)["logits"]
                if logits.shape == (len(dataset), first.shape[1]) and torch.allclose(logits[: len(first)], first, atol=1e-4):
                    return logits
            logits = torch.cat([first, *(self._teacher_batch(batch) for batch in batches)])
            if self.args.should_save:
                with atomic_path(path) as tmp:
                    save_file({"logits": logits.contiguous()}, str(tmp))
        return logits

    def _teacher_batch(self, batch: dict) -> torch.Tensor:
        return self.teacher(pixel_values=batch["pixel_values"].to(self.args.device)).logits.float().cpu()


class FloraTrainer(DistillationTrainer):
    """Trains a `FloraSupernetForImageClassification`, one sampled subnet per optimizer step.

    Args:
        teacher: the dense model to distill from (usually the model the supernet was made from); None trains
            with cross-entropy only.
        search_space: the space to sample from (e.g. a filtered one); defaults to the supernet's own.
        Other arguments are `transformers.Trainer`'s.
    """

    def __init__(
        self,
        model: FloraSupernetForImageClassification,
        args: FloraTrainingArguments,
        teacher: nn.Module | None = None,
        search_space: FloraSearchSpace | None = None,
        **kwargs,
    ) -> None:
        if not isinstance(model, FloraSupernetForImageClassification):
            raise TypeError(f"FloraTrainer trains a FloraSupernetForImageClassification, got {type(model).__name__}")
        self.search_space = search_space or model.space
        for subnet in (self.search_space.max_subnet(), self.search_space.min_subnet()):
            model.space.validate(subnet)  # the space must belong to this supernet
        super().__init__(model=model, args=args, teacher=teacher, **kwargs)

    # subnet sampling ----------------------------------------------------------------------------------------
    @property
    def current_subnet(self) -> Subnet:
        """The subnet trained at the current optimizer step (the same on every process)."""
        return subnet_for_step(self.search_space, self.args.seed, self.state.global_step, self.args.low_rank_aware)

    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        # global_step only advances at optimizer steps, so every accumulated micro-batch trains the same subnet
        self.model.set_subnet(self.current_subnet)
        return super().training_step(model, inputs, num_items_in_batch)

    # evaluation ---------------------------------------------------------------------------------------------
    def eval_subnets(self) -> dict[str, Subnet]:
        """Named subnets evaluated at each evaluation (`args.eval_subnets`)."""
        subnets = {}
        for name in (n.strip() for n in self.args.eval_subnets.split(",") if n.strip()):
            if name == "min":
                subnets[name] = self.search_space.min_subnet()
            elif name == "max":
                subnets[name] = self.search_space.max_subnet()
            elif name.startswith("uniform:"):
                subnets[name.replace(":", "_")] = self.model.space.uniform_subnet(float(name.split(":", 1)[1]))
            else:
                raise ValueError(f"unknown eval subnet {name!r}: use 'min', 'max' or 'uniform:<ratio>'")
        return subnets

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Evaluates every subnet of `eval_subnets`; metrics are named `<prefix>_<subnet>_<metric>`."""
        metrics = {}
        previous = self.model.active_subnet
        try:
            for name, subnet in self.eval_subnets().items():
                self.model.set_subnet(subnet)
                metrics.update(super().evaluate(eval_dataset, ignore_keys, f"{metric_key_prefix}_{name}"))
        finally:
            self.model.set_subnet(previous)
        return metrics


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened logits, scaled by T² to keep gradient size."""
    return F.kl_div(
        F.log_softmax(student_logits / temperature, dim=-1),
        F.log_softmax(teacher_logits / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    ) * temperature**2

