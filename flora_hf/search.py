"""Search for the most accurate subnet of a trained FLORA supernet within a MACs (and parameter) budget.

`evolutionary_search` follows the official FLORA search (FLORA_SPEC.md §3): an initial population spread evenly
over the size range, then per generation the top candidates breed mutations and crossovers, topped up with new
random candidates; fitness is the top-1 accuracy of the subnet with inherited weights on a held-out split.
It fixes the official code's bugs: size levels are built per block (not from block 0 only) and include the
largest choices, crossover swaps whole block triples so children stay inside a filtered space, every
candidate is checked against the space, and the RNG state is checkpointed so a resumed search ends exactly
where an uninterrupted one would. `random_search` is the baseline: one population of the same random
candidates.

Architecture randomness comes only from `random.Random(seed)`, so every process of a distributed run draws the
same candidates; each process evaluates its share of them and all gather the accuracies.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from torch.utils.data import Dataset

from .data import DataError
from .errors import CheckpointError, FloraError, SearchSpaceError
from .evaluation import evaluate_subnets, maybe_preload, process_layout
from .io import read_json, write_json
from .macs import count_macs, count_params
from .search_space import Choice, FloraSearchSpace
from .supernet import FloraSupernetForImageClassification

SIZE_LEVELS = 9  # official: per block, the choices are binned into 9 equal-width size levels
TRIES_PER_CHILD = 10  # official: at most 250 tries for 25 mutations (or crossovers)
TRIES_PER_RANDOM = 100  # random draws fit a narrow MACs window less often; a draw costs well under a millisecond
STATE_FORMAT = "flora-search-state"
STATE_VERSION = 1

Key = tuple[Choice, ...]  # one (qkv, fc1, fc2) triple per block: how the search identifies a subnet


@dataclass
class Candidate:
    """An evaluated subnet: its MACs and parameters per image and its top-1 accuracy on the search split."""

    subnet: dict[str, float]
    macs: int
    params: int
    accuracy: float

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> Candidate:
        return cls(
            {name: float(ratio) for name, ratio in data["subnet"].items()},
            int(data["macs"]),
            int(data["params"]),
            float(data["accuracy"]),
        )


@dataclass
class SearchResult:
    """The best candidate, every evaluated candidate (in evaluation order) and their Pareto front."""

    best: Candidate
    evaluated: list[Candidate]
    pareto_front: list[Candidate]

    def to_dict(self) -> dict:
        return {
            "best": self.best.to_dict(),
            "evaluated": [c.to_dict() for c in self.evaluated],
            "pareto_front": [c.to_dict() for c in self.pareto_front],
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> SearchResult:
        return cls(
            Candidate.from_dict(data["best"]),
            [Candidate.from_dict(c) for c in data["evaluated"]],
            [Candidate.from_dict(c) for c in data["pareto_front"]],
        )


def pareto_front(candidates: Iterable[Candidate]) -> list[Candidate]:
    """Candidates no other beats in both MACs (lower) and accuracy (higher), by increasing MACs.

    Of several candidates at the same (MACs, accuracy) point only the one with fewest parameters is kept.
    """
    front: list[Candidate] = []
    for candidate in sorted(candidates, key=lambda c: (c.macs, -c.accuracy, c.params)):
        if not front or candidate.accuracy > front[-1].accuracy:
            front.append(candidate)
    return front


def _rank(candidate: Candidate) -> tuple[float, int, int]:
    """Sort key, best first: higher accuracy, then fewer MACs, then fewer parameters."""
    return -candidate.accuracy, candidate.macs, candidate.params


@functools.cache
def _level_multisets(first: int, blocks: int, total: int, levels: int) -> int:
    """How many multisets of `blocks` size levels, each in [first, levels), sum to `total`."""
    if total < 0:
        return 0
    if first == levels:
        return int(blocks == 0 and total == 0)
    return sum(_level_multisets(first + 1, blocks - m, total - m * first, levels) for m in range(blocks + 1))


def _weighted_index(rng: random.Random, weights: list[int]) -> int:
    """An index drawn with probability proportional to integer `weights` (exact, platform-independent)."""
    point = rng.randrange(sum(weights))
    for index, weight in enumerate(weights):
        point -= weight
        if point < 0:
            return index
    raise AssertionError("unreachable")


class _SizeStratifiedSampler:
    """Random subnets spread evenly over the sizes that fit the budget (the official generator, fixed).

    Per block, the allowed triples are binned by cost into `SIZE_LEVELS` equal-width levels, the top one
    included; an empty level of a block borrows its nearest non-empty levels. A draw picks a total level
    uniformly, a multiset of per-block levels with that total uniformly, shuffles it over the blocks and draws a
    triple uniformly within each block's level. Totals whose every subnet misses the MACs window are left out:
    the official sampler draws and rejects them, which gives the same accepted candidates, only slower.
    """

    def __init__(
        self, supernet: FloraSupernetForImageClassification, space: FloraSearchSpace, min_macs: int, max_macs: int
    ) -> None:
        self.levels: list[list[tuple[Choice, ...]]] = []
        bounds: list[list[tuple[int, int]]] = []
        cheapest = [min(space.choices(b), key=lambda c, b=b: space.choice_cost(b, c)) for b in range(len(space.blocks))]
        self.min_macs = count_macs(supernet, space.subnet_from_choices(cheapest))

        def extra_macs(block: int, choice: Choice) -> int:  # exact: MACs add up block by block
            choices = list(cheapest)
            choices[block] = choice
            return count_macs(supernet, space.subnet_from_choices(choices)) - self.min_macs

        for block in range(len(space.blocks)):
            cost = {choice: space.choice_cost(block, choice) for choice in space.choices(block)}
            low, high = min(cost.values()), max(cost.values())
            bins: list[list[Choice]] = [[] for _ in range(SIZE_LEVELS)]
            for choice, value in cost.items():
                level = 0 if high == low else min(SIZE_LEVELS - 1, (value - low) * SIZE_LEVELS // (high - low))
                bins[level].append(choice)
            filled = [level for level, members in enumerate(bins) if members]
            levels = []
            for level in range(SIZE_LEVELS):
                distance = min(abs(level - other) for other in filled)
                levels.append(tuple(c for other in filled if abs(level - other) == distance for c in bins[other]))
            self.levels.append(levels)
            bounds.append(
                [(extra_macs(block, min(m, key=cost.get)), extra_macs(block, max(m, key=cost.get))) for m in levels]
            )
        # cheapest and dearest extra MACs of any level assignment, per total level
        low_by_total, high_by_total = {0: 0}, {0: 0}
        for block_bounds in bounds:
            low_next: dict[int, int] = {}
            high_next: dict[int, int] = {}
            for total in low_by_total:
                for level, (low, high) in enumerate(block_bounds):
                    low_next[total + level] = min(low_next.get(total + level, math.inf), low_by_total[total] + low)
                    high_next[total + level] = max(high_next.get(total + level, -1), high_by_total[total] + high)
            low_by_total, high_by_total = low_next, high_next
        self.max_macs = self.min_macs + max(high_by_total.values())
        self.totals = [
            total
            for total in sorted(low_by_total)
            if self.min_macs + low_by_total[total] <= max_macs and self.min_macs + high_by_total[total] >= min_macs
        ]

    def draw(self, rng: random.Random) -> list[Choice]:
        total, blocks = rng.choice(self.totals), len(self.levels)
        assignment: list[int] = []
        for level in range(SIZE_LEVELS):
            left = blocks - len(assignment)
            count = _weighted_index(
                rng, [_level_multisets(level + 1, left - m, total - m * level, SIZE_LEVELS) for m in range(left + 1)]
            )
            assignment += [level] * count
            total -= count * level
        rng.shuffle(assignment)
        return [rng.choice(levels[level]) for levels, level in zip(self.levels, assignment)]


class _Search:
    """What both strategies share: the budget, the architecture RNG, candidate proposal and evaluation."""

    def __init__(
        self,
        supernet: FloraSupernetForImageClassification,
        eval_dataset: Dataset,
        *,
        space: FloraSearchSpace | None,
        min_macs: int,
        max_macs: int,
        max_params: int | None,
        seed: int,
        batch_size: int,
        accelerator,
        progress: bool,
    ) -> None:
        if min_macs > max_macs:
            raise FloraError(f"min_macs ({min_macs:,}) is larger than max_macs ({max_macs:,})")
        if len(eval_dataset) == 0:
            raise DataError("the search's evaluation dataset is empty")
        self.supernet, self.batch_size = supernet, batch_size
        self.eval_dataset = maybe_preload(eval_dataset, batch_size)
        self.space = space if space is not None else supernet.space
        _check_space(supernet, self.space)
        self.min_macs, self.max_macs, self.max_params = min_macs, max_macs, max_params
        self.accelerator, self.progress = accelerator, progress
        self.choices = [self.space.choices(b) for b in range(len(self.space.blocks))]
        self.rng = random.Random(seed)
        self.evaluated: dict[Key, Candidate] = {}
        self.sampler = _SizeStratifiedSampler(supernet, self.space, min_macs, max_macs)
        least_params = count_params(supernet, self.space.min_subnet())
        if not self.sampler.totals or (max_params is not None and least_params > max_params):
            raise self.budget_error()

    def budget_error(self, reason: str | None = None) -> SearchSpaceError:
        budget = f"{self.min_macs:,} <= MACs <= {self.max_macs:,}"
        if self.max_params is not None:
            budget += f", params <= {self.max_params:,}"
        if reason is not None:
            budget += f" ({reason})"
        return SearchSpaceError(
            f"no subnet of the search space fits the budget {budget}: its subnets have "
            f"{self.sampler.min_macs:,} to {self.sampler.max_macs:,} MACs and "
            f"{count_params(self.supernet, self.space.min_subnet()):,} to "
            f"{count_params(self.supernet, self.space.max_subnet()):,} params"
        )

    # proposals ----------------------------------------------------------------------------------------------
    def mutate(self, parent: Key, probability: float) -> list[Choice]:
        """Each block re-drawn uniformly from its allowed triples with `probability` (official: uniform, not 1/r)."""
        rng = self.rng
        return [rng.choice(self.choices[b]) if rng.random() < probability else c for b, c in enumerate(parent)]

    def crossover(self, first: Key, second: Key) -> list[Choice]:
        """Each block's whole triple from one parent, so a child of a filtered space stays inside it."""
        return [self.rng.choice(pair) for pair in zip(first, second)]

    def propose(self, batch: dict[Key, Candidate], count: int, make: Callable[[], list[Choice]], tries: int) -> None:
        """Adds up to `count` new candidates that fit the budget to `batch`, giving up after `tries` per candidate."""
        wanted = len(batch) + count
        for _ in range(tries * count):
            if len(batch) >= wanted:
                return
            key = tuple(make())
            if key in self.evaluated or key in batch:
                continue
            subnet = self.space.subnet_from_choices(key)
            macs = count_macs(self.supernet, subnet)
            if not self.min_macs <= macs <= self.max_macs:
                continue
            params = count_params(self.supernet, subnet)
            if self.max_params is None or params <= self.max_params:
                batch[key] = Candidate(subnet, macs, params, math.nan)

    def add_random(self, batch: dict[Key, Candidate], count: int) -> None:
        self.propose(batch, count, lambda: self.sampler.draw(self.rng), TRIES_PER_RANDOM)

    def initial(self, count: int) -> dict[Key, Candidate]:
        """`count` random candidates, or as many as bounded tries find; none at all means the budget is impossible."""
        batch: dict[Key, Candidate] = {}
        self.add_random(batch, count)
        if not batch:
            raise self.budget_error(f"none found in {TRIES_PER_RANDOM * count} random draws")
        return batch

    # evaluation ---------------------------------------------------------------------------------------------
    def evaluate(self, batch: dict[Key, Candidate], description: str) -> None:
        """Measures the batch's accuracies, each process its share, and records them (same on every process)."""
        accuracies = evaluate_subnets(
            self.supernet, [candidate.subnet for candidate in batch.values()], self.eval_dataset,
            batch_size=self.batch_size, accelerator=self.accelerator, description=description, progress=self.progress,
        )
        for candidate, accuracy in zip(batch.values(), accuracies):
            candidate.accuracy = accuracy
        self.evaluated.update(batch)

    def top(self, count: int) -> list[Key]:
        """The `count` best candidates evaluated so far (the official running top-k)."""
        ranked = sorted(self.evaluated.items(), key=lambda item: _rank(item[1]))
        return [key for key, _ in ranked[:count]]

    def result(self) -> SearchResult:
        evaluated = list(self.evaluated.values())
        return SearchResult(min(evaluated, key=_rank), evaluated, pareto_front(evaluated))

    # state --------------------------------------------------------------------------------------------------
    def state(self, settings: dict, generation: int) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "settings": settings,
            "generation": generation,
            "rng_state": [version, list(internal), gauss],
            "evaluated": [candidate.to_dict() for candidate in self.evaluated.values()],
        }

    def restore(self, state: dict) -> None:
        version, internal, gauss = state["rng_state"]
        self.rng.setstate((version, tuple(internal), gauss))
        for data in state["evaluated"]:
            candidate = Candidate.from_dict(data)
            self.evaluated[tuple(self.space.block_choices_of(self.space.validate(candidate.subnet)))] = candidate


def _check_space(supernet: FloraSupernetForImageClassification, space: FloraSearchSpace) -> None:
    """The searched space must be the supernet's or a filtered part of it, or `set_subnet` would fail mid-search."""
    if space.blocks != supernet.space.blocks:
        raise SearchSpaceError("the search space's blocks and groups are not those of the supernet")
    for block in range(len(space.blocks)):
        outside = set(space.choices(block)) - set(supernet.space.choices(block))
        if outside:
            raise SearchSpaceError(f"block {block} triple {min(outside)} is not in the supernet's search space")


def _load_state(path: Path, settings: dict) -> dict | None:
    """The saved state of a search with exactly these settings, None without a file; raises on any mismatch."""
    if not path.exists():
        return None
    try:
        state = read_json(path)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read search state {path}: {error}") from error
    fields = {"format", "version", "settings", "generation", "rng_state", "evaluated"}
    if not (isinstance(state, dict) and fields <= state.keys() and state["format"] == STATE_FORMAT) or (
        state["version"] != STATE_VERSION
    ):
        raise CheckpointError(f"{path} is not a flora-hf search state (format {STATE_FORMAT!r} v{STATE_VERSION})")
    saved = state["settings"]
    differing = [
        name if name == "space" else f"{name}: {saved.get(name)!r} there, {settings[name]!r} now"
        for name in settings
        if saved.get(name) != settings[name]
    ]
    if differing:
        raise SearchSpaceError(
            f"search state {path} was written by a search with other settings ({'; '.join(differing)}); "
            "pass another state_path or delete the file to start afresh"
        )
    return state


def evolutionary_search(
    supernet: FloraSupernetForImageClassification,
    eval_dataset: Dataset,
    *,
    min_macs: int,
    max_macs: int,
    space: FloraSearchSpace | None = None,
    max_params: int | None = None,
    population: int = 50,
    parents: int = 10,
    generations: int = 20,
    mutations: int = 25,
    crossovers: int = 25,
    mutation_prob: float = 0.2,
    seed: int = 0,
    batch_size: int = 256,
    state_path: str | os.PathLike | None = None,
    accelerator=None,
    progress: bool = True,
) -> SearchResult:
    """FLORA's evolutionary search for the most accurate subnet with `min_macs <= MACs <= max_macs`.

    Evaluates an initial population, then `generations` generations of `mutations` + `crossovers` children of
    the `parents` best candidates so far, topped up with random candidates to `population`. No subnet is
    evaluated twice; `best` is the most accurate of all (ties: fewer MACs). `space` defaults to the supernet's
    and may be a filtered part of it. With `state_path` the state is saved after every generation and a run
    finds it and resumes, ending exactly as an uninterrupted run; a larger `generations` extends a finished run.
    Every process of a distributed run (`accelerator`, or torch.distributed) must call this with the same
    arguments.
    """
    if population < 1 or parents < 1 or generations < 0 or mutations < 0 or crossovers < 0:
        raise FloraError("population and parents must be positive; generations, mutations and crossovers >= 0")
    if not 0.0 <= mutation_prob <= 1.0:
        raise FloraError(f"mutation_prob must be in [0, 1], got {mutation_prob}")
    search = _Search(
        supernet,
        eval_dataset,
        space=space,
        min_macs=min_macs,
        max_macs=max_macs,
        max_params=max_params,
        seed=seed,
        batch_size=batch_size,
        accelerator=accelerator,
        progress=progress,
    )
    settings = {
        "min_macs": min_macs,
        "max_macs": max_macs,
        "max_params": max_params,
        "seed": seed,
        "population": population,
        "parents": parents,
        "mutations": mutations,
        "crossovers": crossovers,
        "mutation_prob": mutation_prob,
        "size_levels": SIZE_LEVELS,
        "eval_examples": len(eval_dataset),
        "space": search.space.to_dict(),
    }
    settings = json.loads(json.dumps(settings))  # compared with a saved state as JSON reads it back
    state_path = None if state_path is None else Path(state_path)
    state = None if state_path is None else _load_state(state_path, settings)
    is_main = process_layout(accelerator)[0] == 0

    def save(generation: int) -> None:
        if state_path is not None and is_main:
            write_json(state_path, search.state(settings, generation))

    if state is None:
        search.evaluate(search.initial(population), "search: initial population")
        done = 0
        save(done)
    else:
        search.restore(state)
        done = state["generation"]
        if done > generations:
            raise SearchSpaceError(
                f"search state {state_path} already holds {done} generations, more than the {generations} asked for"
            )
    while done < generations:
        elite = search.top(parents)
        batch: dict[Key, Candidate] = {}
        pick = search.rng.choice
        search.propose(batch, mutations, lambda: search.mutate(pick(elite), mutation_prob), TRIES_PER_CHILD)
        search.propose(batch, crossovers, lambda: search.crossover(pick(elite), pick(elite)), TRIES_PER_CHILD)
        search.add_random(batch, population - len(batch))
        done += 1
        search.evaluate(batch, f"search: generation {done}/{generations}")
        save(done)
    return search.result()


def random_search(
    supernet: FloraSupernetForImageClassification,
    eval_dataset: Dataset,
    *,
    min_macs: int,
    max_macs: int,
    num_candidates: int,
    space: FloraSearchSpace | None = None,
    max_params: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    accelerator=None,
    progress: bool = True,
) -> SearchResult:
    """The random-search baseline: `num_candidates` distinct subnets drawn like evolution's initial population.

    Draws are spread evenly over the sizes that fit the budget, each block's triple uniform within its size level.
    """
    if num_candidates < 1:
        raise FloraError(f"num_candidates must be positive, got {num_candidates}")
    search = _Search(
        supernet,
        eval_dataset,
        space=space,
        min_macs=min_macs,
        max_macs=max_macs,
        max_params=max_params,
        seed=seed,
        batch_size=batch_size,
        accelerator=accelerator,
        progress=progress,
    )
    search.evaluate(search.initial(num_candidates), "random search")
    return search.result()
