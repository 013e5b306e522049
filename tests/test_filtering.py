import json

import pytest
from tiny_models import make_model

from flora_hf import FloraSearchSpace, FloraSupernetForImageClassification, SearchSpaceError
from flora_hf.data import load_image_dataset, make_image_processor
from flora_hf.filtering import DENSE, CandidateScore, filter_search_space, flops_penalized_score, keep_choices
from flora_hf.trainer import FloraTrainer, FloraTrainingArguments


@pytest.fixture(scope="module")
def digits():
    return load_image_dataset("digits", make_image_processor(16))


def args(output_dir, **overrides):
    return FloraTrainingArguments(output_dir=str(output_dir), num_train_epochs=1, per_device_train_batch_size=64,
                                  learning_rate=1e-3, report_to=[], use_cpu=True, disable_tqdm=True,
                                  save_strategy="no", **overrides)


def test_keep_rules():
    scores = [CandidateScore((r, r, r), accuracy, r) for r, accuracy in [(0.25, 0.5), (0.5, 0.9), (0.75, 0.92), (1.0, 0.93)]]
    assert keep_choices(scores, lambda c: c.accuracy, keep_fraction=0.5) == [(1.0, 1.0, 1.0), (0.75, 0.75, 0.75)]
    by_cost = keep_choices(scores, flops_penalized_score(0.1), keep_fraction=0.25)
    assert by_cost == [(0.5, 0.5, 0.5), DENSE], "the cheap, accurate triple wins; dense is always kept"
    assert keep_choices(scores, lambda c: c.accuracy, keep_fraction=None, max_accuracy_drop=0.05) == [
        (1.0, 1.0, 1.0), (0.75, 0.75, 0.75), (0.5, 0.5, 0.5)]
    with pytest.raises(SearchSpaceError, match="exactly one"):
        keep_choices(scores, lambda c: c.accuracy, keep_fraction=0.3, max_accuracy_drop=0.1)
    with pytest.raises(SearchSpaceError, match="keep_fraction"):
        keep_choices(scores, lambda c: c.accuracy, keep_fraction=1.5)


def test_filtering_on_digits_resumes_and_feeds_training(digits, tmp_path):
    dense = make_model("vit", num_labels=10)
    space = FloraSearchSpace.from_model(dense, ratios=(0.125, 0.5, 1.0))
    output = tmp_path / "filter"
    filtered = filter_search_space(dense, digits["train"], digits["validation"], args(output), space=space,
                                   train_fraction=0.3, keep_fraction=0.3)
    assert filtered.blocks == space.blocks
    for block in range(len(space.blocks)):
        kept = filtered.choices(block)
        assert DENSE in kept and len(kept) in (9, 10)  # ceil(0.3 * 27) = 9, plus dense if it ranked lower
        assert set(kept) < set(space.choices(block)), "filtering keeps a strict subset"
        scores = json.loads((output / f"block-{block}.json").read_text())["scores"]
        assert len(scores) == 27 and all(0 <= s["accuracy"] <= 1 for s in scores)
    assert FloraSearchSpace.load(output / "space.json") == filtered
    assert not any(output.glob("block-*-training")), "finished blocks leave only their JSON"

    # a killed run resumes at the next unfinished block: finished blocks are not retrained
    (output / "block-1.json").unlink()
    (output / "space.json").unlink()
    stamp = (output / "block-0.json").stat().st_mtime
    again = filter_search_space(dense, digits["train"], digits["validation"], args(output), space=space,
                                train_fraction=0.3, keep_fraction=0.3)
    assert (output / "block-0.json").stat().st_mtime == stamp
    assert again.choices(0) == filtered.choices(0)

    supernet = FloraSupernetForImageClassification.from_dense(dense, space=space)
    trainer = FloraTrainer(model=supernet, args=args(tmp_path / "train", max_steps=3), teacher=dense,
                           search_space=filtered, train_dataset=digits["train"])
    trainer.train()
    assert filtered.block_choices_of(supernet.active_subnet)[0] in filtered.choices(0)


def test_filtering_needs_dense_ratio(digits, tmp_path):
    dense = make_model("vit", num_labels=10)
    space = FloraSearchSpace.from_model(dense, ratios=(0.25, 0.5))
    with pytest.raises(SearchSpaceError, match="needs ratio 1.0"):
        filter_search_space(dense, digits["train"], digits["validation"], args(tmp_path), space=space)
