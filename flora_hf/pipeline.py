"""The FLORA pipeline as resumable stages over one run directory.

dense model -> (SPViT pruning, when `spvit.enabled`) -> candidate filtering -> supernet training -> search per MACs budget -> export + fine-tune of each
best subnet (and of the uniform-rank baselines) -> evaluation on the test split -> report.

Every stage writes its output atomically and is skipped when that output exists, so `flora-hf run` can be
killed and started again; long stages (training, search) also resume from their own checkpoints.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml
from accelerate import PartialState
from datasets import DatasetDict
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

from .architectures import SUPPORTED_CLASSES
from .checkpoints import load_compact, load_dense
from .data import load_image_dataset, make_image_processor
from .errors import FloraError
from .evaluation import evaluate_accuracy
from .filtering import FILTERED_SPACE_FILE, filter_search_space, flops_penalized_score
from .hub import render_model_card
from .io import atomic_directory, read_json, write_json
from .macs import count_macs, count_params
from .modeling_flora import COMPACT_CLASSES
from .recipe import RecipeError, training_kwargs
from .search import SearchResult, evolutionary_search, random_search
from .search_space import FloraSearchSpace, Subnet
from .supernet import FloraSupernetForImageClassification
from .trainer import DistillationTrainer, FloraTrainer, FloraTrainingArguments, accuracy_metrics

SPVIT_MODEL_DIR = "spvit"

RECIPE_FILE = "recipe.yaml"
REPORT_FILE = "report.json"
SUPERNET_SPACE_FILE = "search_space.json"


@dataclass
class Run:
    """One run directory and its recipe; stages read what earlier stages wrote there."""

    recipe: dict[str, Any]
    output_dir: Path
    state: PartialState = field(default_factory=PartialState)

    # inputs ------------------------------------------------------------------------------------------------
    @cached_property
    def image_processor(self):
        source = self.recipe["model"]["name_or_path"]
        if source is not None:
            return AutoImageProcessor.from_pretrained(source)
        config = self.recipe["model"]["config"]
        return make_image_processor(config.get("image_size", 224))

    @cached_property
    def datasets(self) -> DatasetDict:
        data = self.recipe["data"]
        with self.state.main_process_first():
            return load_image_dataset(self.recipe["dataset"], self.image_processor, seed=self.recipe["seed"],
                                      validation_fraction=data["validation_fraction"],
                                      test_fraction=data["test_fraction"])

    @property
    def labels(self) -> list[str]:
        return self.datasets["train"].features["labels"].names

    def path(self, *parts: str) -> Path:
        return self.output_dir.joinpath(*parts)

    def training_args(self, section: dict, name: str, args_class: type = FloraTrainingArguments, **overrides):
        """The `args_class` (TrainingArguments subclass) of a recipe training section, writing to `name`."""
        kwargs = {**training_kwargs(self.recipe, section, self.path(name)), **overrides}
        try:
            return args_class(**kwargs)
        except (TypeError, ValueError) as error:
            raise RecipeError(f"training settings for {name!r}: {error}") from error

    def save_directory(self, name: str, save) -> None:
        """Runs `save(tmp_dir)` on the main process and moves the result to `name` in one rename.

        The stage's working directory `<name>-training` (checkpoints, cached teacher logits) is removed after.
        """
        if self.state.is_main_process:
            with atomic_directory(self.path(name)) as tmp:
                save(tmp)
            shutil.rmtree(self.path(f"{name}-training"), ignore_errors=True)
        self.state.wait_for_everyone()

    # stage 1: dense model ----------------------------------------------------------------------------------
    @cached_property
    def dense(self) -> PreTrainedModel:
        """The dense classifier: the recipe's checkpoint, or one trained here from `model.config`."""
        source = self.recipe["model"]["name_or_path"] or (self.path("dense") if self.path("dense").exists() else None)
        if source is not None:
            model = load_dense(source)
        else:
            model = self._train_dense()
        if model.config.num_labels != len(self.labels):
            raise FloraError(
                f"the dense model has {model.config.num_labels} classes, the dataset {len(self.labels)}: fine-tune it "
                "on this dataset first (or leave model.name_or_path empty to train one here)"
            )
        return model.eval()

    def _train_dense(self) -> PreTrainedModel:
        model_section = self.recipe["model"]
        architecture = model_section["architecture"]
        model_class = {cls.__name__: cls for cls in COMPACT_CLASSES}.get(architecture)
        if model_class is None:
            raise RecipeError(f"model.architecture {architecture!r} is not one of {', '.join(SUPPORTED_CLASSES)}")
        model_type = model_class.config_class.model_type
        config = AutoConfig.for_model(
            model_type, **model_section["config"], num_labels=len(self.labels),
            id2label=dict(enumerate(self.labels)), label2id={name: i for i, name in enumerate(self.labels)},
        )
        model = model_class(config)
        args = self.training_args(self.recipe["train_dense"], "dense-training", TrainingArguments,
                                  remove_unused_columns=False)
        trainer = Trainer(model=model, args=args, train_dataset=self.datasets["train"],
                          eval_dataset=self.datasets["validation"], compute_metrics=accuracy_metrics,
                          data_collator=default_data_collator)
        trainer.train(resume_from_checkpoint=_has_checkpoint(self.path("dense-training")))

        def save(tmp: Path) -> None:
            model.save_pretrained(tmp)
            self.image_processor.save_pretrained(tmp)

        self.save_directory("dense", save)
        return model

    @cached_property
    def base(self) -> PreTrainedModel:
        """The model FLORA decomposes (and distills from): the dense model, or its SPViT-pruned version."""
        if not self.recipe["spvit"]["enabled"]:
            return self.dense
        from .spvit_pipeline import spvit_model

        return spvit_model(self)

    # stage 2: candidate filtering --------------------------------------------------------------------------
    @cached_property
    def full_space(self) -> FloraSearchSpace:
        return FloraSearchSpace.from_model(self.base, ratios=self.recipe["search_space"]["ratios"])

    @cached_property
    def space(self) -> FloraSearchSpace:
        """The space supernet training and search sample from: filtered when the recipe says so."""
        settings = self.recipe["filter"]
        if not settings["enabled"]:
            return self.full_space
        saved = self.path("filter", FILTERED_SPACE_FILE)
        if saved.exists():
            return FloraSearchSpace.load(saved)
        keep_fraction = None if settings["max_accuracy_drop"] is not None else settings["keep_fraction"]
        return filter_search_space(
            self.base, self.datasets["train"], self.datasets["validation"],
            self.training_args(settings["training"], "filter"), space=self.full_space,
            train_fraction=settings["train_fraction"], keep_fraction=keep_fraction,
            max_accuracy_drop=settings["max_accuracy_drop"], score=flops_penalized_score(settings["flops_penalty"]),
            eval_batch_size=self.recipe["evaluate"]["batch_size"],
        )

    # stage 3: supernet training ----------------------------------------------------------------------------
    @cached_property
    def supernet(self) -> FloraSupernetForImageClassification:
        if self.path("supernet").exists():
            supernet = FloraSupernetForImageClassification.from_pretrained(self.path("supernet"))
            supernet.space.check_model(self.base)
            return supernet.eval()
        supernet = FloraSupernetForImageClassification.from_dense(
            self.base, space=self.full_space,
            fold_singular_values=self.recipe["search_space"]["fold_singular_values"],
        )
        args = self.training_args(self.recipe["train_supernet"], "supernet-training")
        trainer = FloraTrainer(model=supernet, args=args, teacher=self.base, search_space=self.space,
                               train_dataset=self.datasets["train"], eval_dataset=self.datasets["validation"])
        trainer.train(resume_from_checkpoint=_has_checkpoint(self.path("supernet-training")))

        def save(tmp: Path) -> None:
            supernet.save_pretrained(tmp)
            self.space.save(tmp / SUPERNET_SPACE_FILE)

        self.save_directory("supernet", save)
        return supernet.eval()

    # stage 4: search ---------------------------------------------------------------------------------------
    @cached_property
    def dense_macs(self) -> int:
        return count_macs(self.dense)

    def budgets(self) -> list[tuple[int, int]]:
        """(min MACs, max MACs) of every budget in the recipe; fractions are of the decomposed model's MACs."""
        settings = self.recipe["search"]
        budgets = []
        for budget in settings["budgets"]:
            if not isinstance(budget, (int, float)) or budget <= 0:
                raise RecipeError(f"search budget {budget!r} must be a positive fraction of dense MACs or a MACs count")
            max_macs = int(budget * count_macs(self.base)) if budget <= 1 else int(budget)
            budgets.append((int(max_macs * (1 - settings["budget_window"])), max_macs))
        return budgets

    def search(self, min_macs: int, max_macs: int) -> tuple[SearchResult, SearchResult]:
        """The evolutionary search at one budget, and random search with as many evaluations as a baseline."""
        settings = self.recipe["search"]
        evolution_file, random_file = self.path("search", f"evolution-{max_macs}.json"), self.path("search", f"random-{max_macs}.json")
        common = dict(min_macs=min_macs, max_macs=max_macs, space=self.space, max_params=settings["max_params"],
                      seed=self.recipe["seed"], batch_size=settings["batch_size"])
        if evolution_file.exists():
            evolution = SearchResult.from_dict(read_json(evolution_file))
        else:
            evolution = evolutionary_search(
                self.supernet, self.datasets["validation"], **common,
                population=settings["population"], parents=settings["parents"], generations=settings["generations"],
                mutations=settings["mutations"], crossovers=settings["crossovers"],
                mutation_prob=settings["mutation_prob"], state_path=self.path("search", f"state-{max_macs}.json"),
            )
            if self.state.is_main_process:
                write_json(evolution_file, evolution.to_dict())
        if random_file.exists():
            baseline = SearchResult.from_dict(read_json(random_file))
        else:
            baseline = random_search(self.supernet, self.datasets["validation"], **common,
                                     num_candidates=len(evolution.evaluated))
            if self.state.is_main_process:
                write_json(random_file, baseline.to_dict())
        self.state.wait_for_everyone()
        return evolution, baseline

    # stage 5: export + fine-tune ---------------------------------------------------------------------------
    def compact(self, name: str, subnet: Subnet, search_settings: dict | None = None) -> PreTrainedModel:
        """The exported, fine-tuned compact model of `subnet`, saved (with its card) as run directory `name`."""
        if self.path(name).exists():
            return load_compact(self.path(name)).eval()
        compact = self.supernet.export_subnet(subnet, image_processor=self.image_processor)
        return self.finetune_and_save(name, compact, self.recipe["finetune"], teacher=self.base,
                                      search_settings=search_settings, subnet=subnet)

    def finetune_and_save(self, name: str, compact: PreTrainedModel, settings: dict, teacher: PreTrainedModel,
                          **card) -> PreTrainedModel:
        """Fine-tunes an exported model with distillation from `teacher` (if `settings`), then saves it with its
        model card (`card`: extra `render_model_card` arguments) as run directory `name`."""
        if settings:
            args = self.training_args(settings, f"{name}-training")
            trainer = DistillationTrainer(model=compact, args=args, teacher=teacher,
                                          train_dataset=self.datasets["train"])
            trainer.train(resume_from_checkpoint=_has_checkpoint(self.path(f"{name}-training")))
        compact.eval()
        compact.model_card = render_model_card(
            compact, base_model=self.recipe["model"]["name_or_path"], dataset=self.recipe["dataset"],
            accuracy=self.accuracy(compact), dense_accuracy=self.dense_entry["accuracy"], dense_macs=self.dense_macs,
            dense_params=self.dense_entry["params"], **card,
        )
        self.save_directory(name, compact.save_pretrained)
        return compact

    # stage 6: evaluation and report ------------------------------------------------------------------------
    def accuracy(self, model: PreTrainedModel) -> float:
        """Top-1 on the test split."""
        return evaluate_accuracy(model, self.datasets["test"], batch_size=self.recipe["evaluate"]["batch_size"])["top1"]

    @cached_property
    def dense_entry(self) -> dict[str, Any]:
        return self.entry(self.dense)

    def entry(self, model: PreTrainedModel) -> dict[str, Any]:
        return {"accuracy": self.accuracy(model), "macs": count_macs(model), "params": count_params(model)}

    def subnet_entry(self, compact: PreTrainedModel, subnet: Subnet) -> dict[str, Any]:
        """`entry` of a fine-tuned compact model plus the test top-1 of its subnet with inherited weights."""
        self.supernet.set_subnet(subnet)
        return {**self.entry(compact), "inherited_accuracy": self.accuracy(self.supernet)}

    def uniform_ratios(self) -> list[float]:
        ratios = self.recipe["uniform"]["ratios"]
        return sorted(ratios if ratios is not None else [r for r in self.full_space.ratios if r < 1.0])


def prepare_run(recipe: dict[str, Any], output_dir: str | Path | None, overwrite: bool = False) -> Run:
    """Opens (or creates) the run directory; refuses a directory that holds another recipe's run."""
    output_dir = Path(output_dir or recipe.get("output_dir") or "")
    if not str(output_dir) or output_dir == Path("."):
        raise RecipeError("no output directory: set output_dir in the recipe or pass --output-dir")
    state = PartialState()
    saved = output_dir / RECIPE_FILE
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        if not saved.exists():
            raise RecipeError(f"{output_dir} is not empty and holds no flora-hf run; pass --overwrite to replace it")
        previous = yaml.safe_load(saved.read_text())
        if previous != recipe:
            changed = sorted(k for k in set(previous) | set(recipe) if previous.get(k) != recipe.get(k))
            raise RecipeError(
                f"{output_dir} holds another run (recipe differs in: {', '.join(changed)}); "
                "pass --overwrite to replace it or choose another --output-dir"
            )
    if state.is_main_process:
        if overwrite and output_dir.exists():
            shutil.rmtree(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        if not saved.exists():
            saved.write_text(yaml.safe_dump(recipe, sort_keys=False))
    state.wait_for_everyone()
    return Run(recipe=recipe, output_dir=output_dir, state=state)


def _has_checkpoint(directory: Path) -> bool | None:
    """`resume_from_checkpoint` value: resume when an earlier attempt left a checkpoint."""
    return True if any(directory.glob("checkpoint-*")) else None


def run_pipeline(run: Run) -> dict[str, Any]:
    """Runs (or resumes) every stage and writes report.json, pareto.png and rank_map.png."""
    from .report import write_report

    report: dict[str, Any] = {"dataset": run.recipe["dataset"], "dense": run.dense_entry,
                              "uniform": [], "flora": [], "random": []}
    if run.recipe["spvit"]["enabled"]:
        report["spvit"] = {**run.entry(run.base), "checkpoint": SPVIT_MODEL_DIR}
    searches = []
    search_settings = {k: v for k, v in run.recipe["search"].items() if k != "budgets"}
    for min_macs, max_macs in run.budgets():
        evolution, baseline = run.search(min_macs, max_macs)
        searches.append(evolution)
        name = f"subnet-{max_macs}"
        settings = {**search_settings, "min_macs": min_macs, "max_macs": max_macs,
                    "filtered_space": run.recipe["filter"]["enabled"]}
        compact = run.compact(name, evolution.best.subnet, search_settings=settings)
        report["flora"].append({"max_macs": max_macs, **run.subnet_entry(compact, evolution.best.subnet),
                                "subnet": evolution.best.subnet,
                                "checkpoint": name, "search_accuracy": evolution.best.accuracy})
        report["random"].append({"max_macs": max_macs, "macs": baseline.best.macs,
                                 "search_accuracy": baseline.best.accuracy, "evaluated": len(baseline.evaluated)})
    for ratio in run.uniform_ratios():
        subnet = run.full_space.uniform_subnet(ratio)
        compact = run.compact(f"uniform-{ratio:g}", subnet)
        report["uniform"].append({"ratio": ratio, **run.subnet_entry(compact, subnet), "checkpoint": f"uniform-{ratio:g}"})
    if run.state.is_main_process:
        write_report(report, searches, run.output_dir)
    run.state.wait_for_everyone()
    return report
