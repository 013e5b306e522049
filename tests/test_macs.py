import random

import pytest
import torch
from tiny_models import make_model, pixel_values
from torch.utils.flop_counter import FlopCounterMode
from transformers import DeiTConfig, DeiTForImageClassification

from flora_hf import FloraSearchSpace, FloraSupernetForImageClassification, count_macs, count_params


def counted_macs(model) -> int:
    """MACs per image as torch's FLOP counter sees them (eager attention)."""
    model.set_attn_implementation("eager")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(pixel_values=pixel_values(model, batch=1))
    return counter.get_total_flops() // 2


def test_dense_macs_match_flop_counter(kind):
    model = make_model(kind)
    assert count_macs(model) == pytest.approx(counted_macs(model), rel=0.01)


def test_subnet_macs_match_flop_counter_of_export(kind):
    supernet = FloraSupernetForImageClassification.from_dense(make_model(kind))
    for seed in range(3):
        subnet = supernet.space.sample(random.Random(seed))
        compact = supernet.export_subnet(subnet)
        assert count_macs(supernet, subnet) == pytest.approx(counted_macs(compact), rel=0.01)
        assert count_macs(compact) == count_macs(supernet, subnet)
        assert count_macs(make_model(kind), subnet) == count_macs(supernet, subnet)


def test_active_subnet_is_default():
    supernet = FloraSupernetForImageClassification.from_dense(make_model("vit"))
    subnet = supernet.space.min_subnet()
    supernet.set_subnet(subnet)
    assert count_macs(supernet) == count_macs(supernet, subnet) < count_macs(supernet, supernet.space.max_subnet())


def test_low_rank_only_counted_when_cheaper():
    model = make_model("vit")  # hidden 32, intermediate 64: fc1 break-even rank is 32*64/96 = 21.3
    space = FloraSearchSpace.from_model(model, ratios=(0.75, 1.0))
    dense = count_macs(model)
    subnet = space.max_subnet()
    subnet["vit.layers.0.mlp.fc1"] = 0.75  # rank 24: 24*96 = 2304 > 2048 dense
    assert count_macs(model, subnet) == dense
    assert count_params(model, subnet) == count_params(model)


def test_params_match_export():
    supernet = FloraSupernetForImageClassification.from_dense(make_model("swin"))
    subnet = supernet.space.sample(random.Random(1))
    compact = supernet.export_subnet(subnet)
    assert count_params(supernet, subnet) == sum(p.numel() for p in compact.parameters()) == count_params(compact)
    assert count_params(compact) < count_params(make_model("swin"))


def test_deit_base_is_17_6_gmacs():
    model = DeiTForImageClassification(DeiTConfig(num_labels=1000))  # 224px, patch 16, hidden 768, 12 layers
    assert count_macs(model) == pytest.approx(17.6e9, rel=0.01)
    space = FloraSearchSpace.from_model(model)
    # uniform ratio 1/2 from FLORA's formula: 11.99 G (which also counts LayerNorms)
    assert count_macs(model, space.uniform_subnet(0.5)) == pytest.approx(11.99e9, rel=0.01)
