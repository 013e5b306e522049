"""Evolutionary / random search and accuracy evaluation on a tiny ViT supernet and synthetic images.

Run as a script (`accelerate launch --multi_gpu --num_processes 2 tests/test_search.py OUT`) it is the
distributed half of `test_distributed_search_matches_single_process`.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import make_model
from torch import nn

from flora_hf import CheckpointError, FloraSupernetForImageClassification, SearchSpaceError, count_macs, count_params
from flora_hf.evaluation import evaluate_accuracy
from flora_hf.search import (
    Candidate,
    SearchResult,
    _SizeStratifiedSampler,
    evolutionary_search,
    pareto_front,
    random_search,
)

SMALL = dict(population=8, parents=3, generations=3, mutations=4, crossovers=4, progress=False)


def make_supernet():
    return FloraSupernetForImageClassification.from_dense(make_model("vit"))


def make_dataset(n=40, classes=5):
    generator = torch.Generator().manual_seed(0)
    return [{"pixel_values": torch.randn(3, 16, 16, generator=generator), "labels": i % classes} for i in range(n)]


def middle_budget(supernet, space=None):
    """The middle half of the space's MACs range."""
    space = space or supernet.space
    low, high = count_macs(supernet, space.min_subnet()), count_macs(supernet, space.max_subnet())
    return dict(min_macs=low + (high - low) // 4, max_macs=low + 3 * (high - low) // 4)


@pytest.fixture(scope="module")
def supernet():
    return make_supernet()


@pytest.fixture(scope="module")
def dataset():
    return make_dataset()


@pytest.fixture(scope="module")
def budget(supernet):
    return middle_budget(supernet)


@pytest.fixture(scope="module")
def result(supernet, dataset, budget):
    return evolutionary_search(supernet, dataset, **budget, **SMALL)


def key(subnet):
    return json.dumps(subnet, sort_keys=True)


def test_candidates_fit_budget_and_space_and_are_distinct(supernet, dataset, budget, result):
    assert 8 < len(result.evaluated) <= 8 * 4
    assert len({key(c.subnet) for c in result.evaluated}) == len(result.evaluated)
    for candidate in result.evaluated:
        supernet.space.validate(candidate.subnet)
        assert candidate.macs == count_macs(supernet, candidate.subnet)
        assert candidate.params == count_params(supernet, candidate.subnet)
        assert budget["min_macs"] <= candidate.macs <= budget["max_macs"]
        assert 0.0 <= candidate.accuracy <= 1.0
    candidate = result.evaluated[-1]
    supernet.set_subnet(candidate.subnet)
    assert candidate.accuracy == evaluate_accuracy(supernet, dataset)["top1"]


def test_best_is_argmax_and_front_is_non_dominated(result):
    best_accuracy = max(c.accuracy for c in result.evaluated)
    assert result.best.accuracy == best_accuracy
    assert result.best.macs == min(c.macs for c in result.evaluated if c.accuracy == best_accuracy)
    front = result.pareto_front
    assert front[0].macs == min(c.macs for c in result.evaluated) and result.best in front
    assert [c.macs for c in front] == sorted(c.macs for c in front)
    assert all(a.macs < b.macs and a.accuracy < b.accuracy for a, b in zip(front, front[1:]))
    for candidate in result.evaluated:  # everything is on the front or dominated by a member of it
        assert any(f.macs <= candidate.macs and f.accuracy >= candidate.accuracy for f in front)


def test_pareto_front_of_known_points():
    def point(macs, accuracy, params=0):
        return Candidate({}, macs, params, accuracy)

    points = [point(3, 0.5), point(1, 0.2), point(2, 0.2), point(2, 0.6, 9), point(2, 0.6, 5), point(4, 0.6)]
    assert pareto_front(points) == [point(1, 0.2), point(2, 0.6, 5)]


def test_same_seed_same_result_and_json_round_trip(supernet, dataset, budget, result):
    again = evolutionary_search(supernet, dataset, **budget, **SMALL)
    assert again.to_dict() == result.to_dict()
    other = evolutionary_search(supernet, dataset, **budget, **{**SMALL, "seed": 1})
    assert [c.subnet for c in other.evaluated] != [c.subnet for c in result.evaluated]
    assert SearchResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_search_leaves_the_active_subnet(supernet, dataset, budget):
    subnet = supernet.space.min_subnet()
    supernet.set_subnet(subnet)
    random_search(supernet, dataset, **budget, num_candidates=3, progress=False)
    assert supernet.active_subnet == subnet


def test_resume_after_a_finished_shorter_run(supernet, dataset, budget, result, tmp_path):
    state_path = tmp_path / "state.json"
    evolutionary_search(supernet, dataset, **budget, **{**SMALL, "generations": 1}, state_path=state_path)
    state = json.loads(state_path.read_text())
    assert state["format"] == "flora-search-state" and state["generation"] == 1
    resumed = evolutionary_search(supernet, dataset, **budget, **SMALL, state_path=state_path)
    assert resumed.to_dict() == result.to_dict()
    assert json.loads(state_path.read_text())["generation"] == 3
    # a finished search returns its result without evaluating anything
    finished = evolutionary_search(supernet, dataset, **budget, **SMALL, state_path=state_path)
    assert finished.to_dict() == result.to_dict()
    with pytest.raises(SearchSpaceError, match="already holds 3 generations"):
        evolutionary_search(supernet, dataset, **budget, **{**SMALL, "generations": 2}, state_path=state_path)


def test_resume_after_a_kill(supernet, dataset, budget, result, tmp_path, monkeypatch):
    import flora_hf.search as search_module

    state_path = tmp_path / "state.json"
    evaluate = search_module._Search.evaluate
    calls = []

    def dying_evaluate(self, batch, description):
        calls.append(description)
        if len(calls) == 3:  # killed while evaluating generation 2
            raise KeyboardInterrupt
        evaluate(self, batch, description)

    monkeypatch.setattr(search_module._Search, "evaluate", dying_evaluate)
    with pytest.raises(KeyboardInterrupt):
        evolutionary_search(supernet, dataset, **budget, **SMALL, state_path=state_path)
    monkeypatch.undo()
    assert json.loads(state_path.read_text())["generation"] == 1
    resumed = evolutionary_search(supernet, dataset, **budget, **SMALL, state_path=state_path)
    assert resumed.to_dict() == result.to_dict()


def test_state_of_other_settings_is_refused(supernet, dataset, budget, tmp_path):
    state_path = tmp_path / "state.json"
    evolutionary_search(supernet, dataset, **budget, **{**SMALL, "generations": 0}, state_path=state_path)
    with pytest.raises(SearchSpaceError, match="seed: 0 there, 1 now"):
        evolutionary_search(supernet, dataset, **budget, **{**SMALL, "seed": 1}, state_path=state_path)
    with pytest.raises(SearchSpaceError, match="max_macs"):
        other_budget = {**budget, "max_macs": budget["max_macs"] + 1}
        evolutionary_search(supernet, dataset, **other_budget, **SMALL, state_path=state_path)
    filtered = supernet.space.with_block_choices([supernet.space.choices(b)[:-1] for b in range(2)])
    with pytest.raises(SearchSpaceError, match="space"):
        evolutionary_search(supernet, dataset, **budget, **SMALL, space=filtered, state_path=state_path)
    state_path.write_text('{"format": "flora-search-state", "version": 1')
    with pytest.raises(CheckpointError, match="cannot read search state"):
        evolutionary_search(supernet, dataset, **budget, **SMALL, state_path=state_path)


def test_impossible_budget_is_a_clear_error(supernet, dataset):
    low = count_macs(supernet, supernet.space.min_subnet())
    high = count_macs(supernet, supernet.space.max_subnet())
    message = f"no subnet of the search space fits the budget.*{low:,} to {high:,} MACs"
    with pytest.raises(SearchSpaceError, match=message):
        evolutionary_search(supernet, dataset, min_macs=0, max_macs=low - 1, **SMALL)
    with pytest.raises(SearchSpaceError, match=message):
        random_search(supernet, dataset, min_macs=high + 1, max_macs=2 * high, num_candidates=4, progress=False)
    with pytest.raises(SearchSpaceError, match="params <= 10"):
        evolutionary_search(supernet, dataset, min_macs=low, max_macs=high, max_params=10, **SMALL)
    # inside the range, but between the only MACs values a two-choice space has
    tiny, full = (0.125, 0.125, 0.125), (1.0, 1.0, 1.0)
    space = supernet.space.with_block_choices([[tiny, full], [tiny, full]])
    one_full = count_macs(supernet, space.subnet_from_choices([full, tiny]))
    with pytest.raises(SearchSpaceError, match="none found in 800 random draws"):
        evolutionary_search(supernet, dataset, min_macs=one_full + 1, max_macs=high - 1, space=space, **SMALL)


def test_filtered_space_is_never_left(supernet, dataset):
    rng = random.Random(0)
    space = supernet.space
    filtered = space.with_block_choices([rng.sample(space.choices(b), 25) + [(1.0, 1.0, 1.0)] for b in range(2)])
    budget = middle_budget(supernet, filtered)
    result = evolutionary_search(supernet, dataset, **budget, space=filtered, **{**SMALL, "generations": 4})
    assert len(result.evaluated) > 20
    for candidate in result.evaluated:
        filtered.validate(candidate.subnet)
        assert budget["min_macs"] <= candidate.macs <= budget["max_macs"]


def test_random_search_respects_the_budget(supernet, dataset, budget):
    result = random_search(supernet, dataset, **budget, num_candidates=12, max_params=10**9, progress=False)
    assert len(result.evaluated) == 12 and len({key(c.subnet) for c in result.evaluated}) == 12
    assert all(budget["min_macs"] <= c.macs <= budget["max_macs"] for c in result.evaluated)
    assert result.best.accuracy == max(c.accuracy for c in result.evaluated)
    params = sorted(c.params for c in result.evaluated)
    capped = random_search(supernet, dataset, **budget, num_candidates=12, max_params=params[3], progress=False)
    assert all(c.params <= params[3] for c in capped.evaluated)


def test_random_candidates_cover_the_size_range_in_every_block(supernet):
    space = supernet.space
    big = [c for c in space.choices(1) if sum(c) >= 2.5]
    # block 0 has two choices only: the official generator would give block 1 two size levels as well
    filtered = space.with_block_choices([[(0.125,) * 3, (1.0,) * 3], space.choices(1)])
    low, high = count_macs(supernet, filtered.min_subnet()), count_macs(supernet, filtered.max_subnet())
    sampler = _SizeStratifiedSampler(supernet, filtered, low, high)
    assert (sampler.min_macs, sampler.max_macs) == (low, high)
    assert (1.0, 1.0, 1.0) in sampler.levels[1][-1]  # the largest choices are drawn too
    rng = random.Random(0)
    draws = [sampler.draw(rng) for _ in range(900)]
    block1_costs = {filtered.choice_cost(1, choice[1]) for choice in draws}
    assert len(block1_costs) > 20 and any(choice[1] in big for choice in draws)
    macs = [count_macs(supernet, filtered.subnet_from_choices(choice)) for choice in draws]
    quarters = [sum(low + q * (high - low) / 4 <= m < low + (q + 1) * (high - low) / 4 for m in macs) for q in range(4)]
    assert min(quarters) > 0.1 * len(draws), quarters


class ConstantClassifier(nn.Module):
    """Logits [0, 1, 5, 4, 3] for every image: class 2 first, then 3, 4, 1, 0."""

    def __init__(self):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor([0.0, 1.0, 5.0, 4.0, 3.0]))
        self.saw_inference_mode = None

    def forward(self, pixel_values):
        self.saw_inference_mode = torch.is_inference_mode_enabled()
        return type("Output", (), {"logits": self.logits.expand(pixel_values.shape[0], -1)})


def test_evaluate_accuracy_of_a_known_classifier():
    model = ConstantClassifier().train()
    accuracy = evaluate_accuracy(model, make_dataset(n=50), batch_size=16, top_k=(1, 3, 10))
    assert accuracy == {"top1": 0.2, "top3": 0.6, "top10": 1.0}
    assert model.saw_inference_mode and model.training, "inference mode inside, training mode restored"


def test_distributed_search_matches_single_process(supernet, dataset, budget, result, tmp_path):
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--main_process_port", "29531"]
    process = subprocess.run([*launcher, __file__, str(tmp_path)], capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert process.returncode == 0, process.stderr[-4000:]
    supernet.set_subnet(supernet.space.max_subnet())
    single_accuracy = evaluate_accuracy(supernet, make_dataset(n=47))
    evaluations = []
    for rank in (0, 1):
        output = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert output["accelerator"] == output["torch_distributed"] == result.to_dict()
        assert output["accuracy"] == single_accuracy
        evaluations.append(output["evaluations"])
    assert evaluations[0] > 0 and sum(evaluations) == 2 * len(result.evaluated), "each process evaluates its share"
    assert json.loads((tmp_path / "state.json").read_text())["generation"] == 3


def distributed_main(output_dir: Path) -> None:
    """Each of 2 processes runs the search with an Accelerator and with bare torch.distributed."""
    from accelerate import Accelerator

    import flora_hf.evaluation as evaluation_module

    evaluations = []
    count_correct = evaluation_module.count_correct
    evaluation_module.count_correct = lambda *args, **kwargs: evaluations.append(1) or count_correct(*args, **kwargs)
    accelerator = Accelerator(cpu=True)
    supernet, dataset = make_supernet(), make_dataset()
    budget = middle_budget(supernet)
    output = {
        "accelerator": evolutionary_search(
            supernet, dataset, **budget, **SMALL, accelerator=accelerator, state_path=output_dir / "state.json"
        ).to_dict(),
        "torch_distributed": evolutionary_search(supernet, dataset, **budget, **SMALL).to_dict(),
    }
    output["evaluations"] = len(evaluations)
    output["accuracy"] = evaluate_accuracy(supernet, make_dataset(n=47), accelerator=accelerator)  # max subnet
    (output_dir / f"rank{accelerator.process_index}.json").write_text(json.dumps(output))


if __name__ == "__main__":
    distributed_main(Path(sys.argv[1]))
