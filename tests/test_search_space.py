import json
import math
import random
from collections import Counter

import pytest
from tiny_models import make_model
from transformers import ResNetConfig, ResNetForImageClassification

from flora_hf import FloraSearchSpace, SearchSpaceError, UnsupportedModelError


def test_groups_per_block(kind):
    model = make_model(kind)
    space = FloraSearchSpace.from_model(model)
    depth = 2 if kind != "swin" else 3
    assert len(space.blocks) == depth
    qkv, fc1, fc2 = space.blocks[0]
    assert qkv.name.endswith(".attention.qkv") and fc1.name.endswith(".mlp.fc1") and fc2.name.endswith(".mlp.fc2")
    assert qkv.out_features == 3 * qkv.in_features
    if kind == "vit":
        assert [g.name for g in space.blocks[1]] == [
            "vit.layers.1.attention.qkv", "vit.layers.1.mlp.fc1", "vit.layers.1.mlp.fc2"]


def test_unsupported_architecture_names_supported_ones():
    model = ResNetForImageClassification(ResNetConfig(hidden_sizes=[8, 8], depths=[1, 1], embedding_size=8))
    with pytest.raises(UnsupportedModelError, match="ResNetForImageClassification is not supported.*ViTForImageClassification"):
        FloraSearchSpace.from_model(model)


def test_max_min_and_validation():
    space = FloraSearchSpace.from_model(make_model("vit"))
    assert set(space.max_subnet().values()) == {1.0}
    assert set(space.min_subnet().values()) == {0.125}
    subnet = space.max_subnet()
    assert space.validate(subnet) == subnet
    with pytest.raises(SearchSpaceError, match="'vit.layers.9.mlp.fc1', which is not in"):
        space.validate({**subnet, "vit.layers.9.mlp.fc1": 0.5})
    missing = dict(subnet)
    del missing["vit.layers.0.mlp.fc2"]
    with pytest.raises(SearchSpaceError, match="no ratio for group 'vit.layers.0.mlp.fc2'"):
        space.validate(missing)
    with pytest.raises(SearchSpaceError, match="ratio 0.3 for group 'vit.layers.0.mlp.fc1' is not one of"):
        space.validate({**subnet, "vit.layers.0.mlp.fc1": 0.3})
    for bad in (0.0, 1.5, -0.1, "half", True):
        with pytest.raises(SearchSpaceError, match="invalid rank ratio"):
            space.validate({**subnet, "vit.layers.0.mlp.fc1": bad})


@pytest.mark.parametrize("ratios", [(0.0, 1.0), (0.5, 1.2), ()])
def test_invalid_ratio_choices(ratios):
    with pytest.raises(SearchSpaceError):
        FloraSearchSpace.from_model(make_model("vit"), ratios=ratios)


def test_weighted_sampling_follows_inverse_product():
    space = FloraSearchSpace.from_model(make_model("vit"), ratios=(0.25, 0.5, 1.0))
    rng = random.Random(0)
    draws = Counter(space.block_choices_of(space.sample(rng))[0] for _ in range(20000))
    choices = space.choices(0)
    weights = {c: 1 / math.prod(c) for c in choices}
    total = sum(weights.values())
    for choice in [(0.25, 0.25, 0.25), (1.0, 1.0, 1.0), (0.5, 0.25, 1.0)]:
        assert draws[choice] / 20000 == pytest.approx(weights[choice] / total, abs=0.01)
    uniform = Counter(space.block_choices_of(space.sample(rng, weighted=False))[0] for _ in range(20000))
    assert uniform[(1.0, 1.0, 1.0)] / 20000 == pytest.approx(1 / 27, abs=0.01)


def test_sampling_is_reproducible():
    space = FloraSearchSpace.from_model(make_model("vit"))
    assert space.sample(random.Random(3)) == space.sample(random.Random(3))


def test_filtered_space(tmp_path):
    space = FloraSearchSpace.from_model(make_model("vit"))
    kept = [[(1.0, 1.0, 1.0), (0.5, 0.25, 0.5)], [(1.0, 1.0, 1.0), (0.125, 0.125, 1.0), (0.25, 0.5, 0.5)]]
    filtered = space.with_block_choices(kept)
    assert filtered.num_subnets() == 6
    # ordered by cost: (1/8, 1/8, dense) has fewer weights than (1/4, 1/2, 1/2)
    assert filtered.block_choices_of(filtered.min_subnet()) == [(0.5, 0.25, 0.5), (0.125, 0.125, 1.0)]
    for seed in range(20):
        subnet = filtered.sample(random.Random(seed))
        assert tuple(subnet[g.name] for g in filtered.blocks[0]) in kept[0]
    outside = filtered.subnet_from_choices([(0.5, 0.25, 0.5), (0.125, 0.125, 0.125)])
    with pytest.raises(SearchSpaceError, match="block 1 triple"):
        filtered.validate(outside)
    path = tmp_path / "space.json"
    filtered.save(path)
    assert json.loads(path.read_text())["version"] == 1
    assert FloraSearchSpace.load(path) == filtered
    with pytest.raises(SearchSpaceError, match="not a triple"):
        space.with_block_choices([[(0.3, 1.0, 1.0)], [(1.0, 1.0, 1.0)]])


def test_json_round_trip_and_bad_files(tmp_path):
    space = FloraSearchSpace.from_model(make_model("swin"))
    path = tmp_path / "space.json"
    space.save(path)
    assert FloraSearchSpace.load(path) == space
    path.write_text("{not json")
    with pytest.raises(SearchSpaceError, match="cannot read search space"):
        FloraSearchSpace.load(path)
    path.write_text(json.dumps({"hello": 1}))
    with pytest.raises(SearchSpaceError, match="not a flora-hf search space"):
        FloraSearchSpace.load(path)
    path.write_text(json.dumps({**space.to_dict(), "version": 99}))
    with pytest.raises(SearchSpaceError, match="version 99"):
        FloraSearchSpace.load(path)


def test_space_must_match_model():
    space = FloraSearchSpace.from_model(make_model("vit"))
    space.check_model(make_model("vit", seed=5))
    with pytest.raises(SearchSpaceError, match="does not match DeiTForImageClassification"):
        space.check_model(make_model("deit"))
