"""Low-rank-aware candidate filtering: keep, per block, the (qkv, fc1, fc2) triples worth searching.

For each block i a "local" supernet is trained where only block i is low-rank (its triple drawn uniformly;
every other block dense, nothing frozen), then every triple of block i is scored on a held split. The kept
triples (always plus the dense one) form the filtered space that supernet training and search then use.
Each finished block is saved as JSON, so a killed run resumes at the next block.
"""

from __future__ import annotations

import math
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn
from torch.utils.data import Dataset, Subset

from .errors import SearchSpaceError
from .evaluation import evaluate_subnets, maybe_preload
from .io import read_json, write_json
from .search_space import Choice, FloraSearchSpace
from .supernet import FloraSupernetForImageClassification
from .trainer import FloraTrainer, FloraTrainingArguments

DENSE: Choice = (1.0, 1.0, 1.0)
FILTERED_SPACE_FILE = "space.json"


@dataclass(frozen=True)
class CandidateScore:
    """One block triple's held-out accuracy and relative cost (its weights / the dense block's)."""

    choice: Choice
    accuracy: float
    relative_cost: float


ScoreFn = Callable[[CandidateScore], float]


def flops_penalized_score(penalty: float) -> ScoreFn:
    """Default score: accuracy minus `penalty` times relative cost, so cheap triples that keep accuracy win.

    The official filtered spaces are FLOPs-aware in this sense (their exact formula was never published):
    with penalty 0.1, a triple at half the dense cost must lose less than 5 points of accuracy to rank above
    the dense triple.
    """
    return lambda candidate: candidate.accuracy - penalty * candidate.relative_cost


def keep_choices(
    scores: Sequence[CandidateScore],
    score: ScoreFn,
    keep_fraction: float | None = 0.3,
    max_accuracy_drop: float | None = None,
) -> list[Choice]:
    """The kept triples of one block, best score first, always including the dense triple.

    `keep_fraction` keeps the best ceil(fraction * N) by `score` (the official rule, 30%); `max_accuracy_drop`
    instead keeps every triple within that accuracy drop of the dense triple.
    """
    if (keep_fraction is None) == (max_accuracy_drop is None):
        raise SearchSpaceError("give exactly one of keep_fraction and max_accuracy_drop")
    ranked = sorted(scores, key=score, reverse=True)
    if keep_fraction is not None:
        if not 0 < keep_fraction <= 1:
            raise SearchSpaceError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
        kept = ranked[: math.ceil(len(ranked) * keep_fraction)]
    else:
        dense_accuracy = next(c.accuracy for c in scores if c.choice == DENSE)
        kept = [c for c in ranked if c.accuracy >= dense_accuracy - max_accuracy_drop]
    choices = [c.choice for c in kept]
    return choices if DENSE in choices else [*choices, DENSE]


def filter_search_space(
    dense_model: nn.Module,
    train_dataset: Dataset,
    eval_dataset: Dataset,
    training_args: FloraTrainingArguments,
    *,
    space: FloraSearchSpace | None = None,
    train_fraction: float = 0.5,
    keep_fraction: float | None = 0.3,
    max_accuracy_drop: float | None = None,
    score: ScoreFn | None = None,
    teacher: nn.Module | None = None,
    eval_batch_size: int = 256,
) -> FloraSearchSpace:
    """Trains one local supernet per block and returns (and saves) the filtered space.

    `training_args.output_dir` holds `block-<i>.json` per finished block and the final `space.json`;
    `train_fraction` of the train split (a seeded random subset) trains each local supernet.
    """
    space = space or FloraSearchSpace.from_model(dense_model)
    space.check_model(dense_model)
    if 1.0 not in space.ratios:
        raise SearchSpaceError("candidate filtering needs ratio 1.0 in the space: other blocks stay dense")
    if not 0 < train_fraction <= 1:
        raise SearchSpaceError(f"train_fraction must be in (0, 1], got {train_fraction}")
    score = score or flops_penalized_score(0.1)
    output_dir = Path(training_args.output_dir)
    subset = _subset(train_dataset, train_fraction, training_args.seed)
    eval_dataset = maybe_preload(eval_dataset, eval_batch_size)
    kept = []
    for block in range(len(space.blocks)):
        result_file = output_dir / f"block-{block}.json"
        if result_file.exists():
            scores = [CandidateScore(tuple(c["choice"]), c["accuracy"], c["relative_cost"])
                      for c in read_json(result_file)["scores"]]
        else:
            scores = _score_block(dense_model, space, block, subset, eval_dataset, training_args, teacher, eval_batch_size)
            if training_args.should_save:
                write_json(result_file, {"block": block, "scores": [c.__dict__ for c in scores]})
                shutil.rmtree(output_dir / f"block-{block}-training", ignore_errors=True)
        kept.append(keep_choices(scores, score, keep_fraction, max_accuracy_drop))
    filtered = space.with_block_choices(kept)
    if training_args.should_save:
        filtered.save(output_dir / FILTERED_SPACE_FILE)
    return filtered


def _score_block(
    dense_model: nn.Module,
    space: FloraSearchSpace,
    block: int,
    train_dataset: Dataset,
    eval_dataset: Dataset,
    training_args: FloraTrainingArguments,
    teacher: nn.Module | None,
    eval_batch_size: int,
) -> list[CandidateScore]:
    """Trains block `block`'s local supernet (resuming its checkpoints), then scores every triple of the block."""
    local_space = space.with_block_choices(
        [space.choices(i) if i == block else [DENSE] for i in range(len(space.blocks))]
    )
    supernet = FloraSupernetForImageClassification.from_dense(dense_model, space=space)
    work_dir = Path(training_args.output_dir) / f"block-{block}-training"
    args = FloraTrainingArguments(
        **{**training_args.to_dict(), "output_dir": str(work_dir), "low_rank_aware": False, "eval_strategy": "no"}
    )
    trainer = FloraTrainer(model=supernet, args=args, teacher=teacher, search_space=local_space, train_dataset=train_dataset)
    trainer.train(resume_from_checkpoint=any(work_dir.glob("checkpoint-*")) or None)
    choices = local_space.choices(block)
    subnets = [local_space.subnet_from_choices([choice if i == block else DENSE for i in range(len(space.blocks))])
               for choice in choices]
    accuracies = evaluate_subnets(supernet, subnets, eval_dataset, batch_size=eval_batch_size,
                                  accelerator=trainer.accelerator, description=f"scoring block {block}")
    dense_cost = space.choice_cost(block, DENSE)
    return [CandidateScore(choice, accuracy, space.choice_cost(block, choice) / dense_cost)
            for choice, accuracy in zip(choices, accuracies)]


def _subset(dataset: Dataset, fraction: float, seed: int) -> Dataset:
    if fraction >= 1:
        return dataset
    count = max(1, round(len(dataset) * fraction))
    indices = sorted(random.Random(seed).sample(range(len(dataset)), count))
    return dataset.select(indices) if hasattr(dataset, "select") else Subset(dataset, indices)
