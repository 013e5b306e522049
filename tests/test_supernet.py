import random

import pytest
import torch
from tiny_models import make_model, pixel_values

from flora_hf import CheckpointError, FloraSearchSpace, FloraSupernetForImageClassification, SearchSpaceError


def logits(model, x):
    with torch.no_grad():
        return model(pixel_values=x).logits


def test_max_subnet_reproduces_dense_logits(kind):
    dense = make_model(kind)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    supernet = FloraSupernetForImageClassification.from_dense(dense)
    supernet.set_subnet(supernet.space.max_subnet())
    x = pixel_values(dense)
    torch.testing.assert_close(logits(supernet, x), logits(dense, x), atol=1e-4, rtol=0)
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in before.items()), "dense model was modified"


def test_ratio_one_runs_the_dense_product():
    supernet = FloraSupernetForImageClassification.from_dense(make_model("vit"))
    supernet.set_subnet(supernet.space.max_subnet())
    layer = supernet.super_layer("vit.layers.0.mlp.fc1")
    assert layer.rank is None
    x = torch.randn(3, layer.in_features)
    torch.testing.assert_close(layer(x), x @ (layer.up.weight @ layer.down.weight).T + layer.up.bias)


@pytest.mark.parametrize("fold", ["down", "official"])
def test_rank_r_is_best_rank_r_approximation(fold):
    dense = make_model("vit")
    supernet = FloraSupernetForImageClassification.from_dense(dense, fold_singular_values=fold)
    for group, weight in [
        ("vit.layers.0.mlp.fc1", dense.vit.layers[0].mlp.fc1.weight),
        ("vit.layers.1.mlp.fc2", dense.vit.layers[1].mlp.fc2.weight),
        ("vit.layers.0.attention.qkv", torch.cat([dense.vit.layers[0].attention.q_proj.weight,
                                                  dense.vit.layers[0].attention.k_proj.weight,
                                                  dense.vit.layers[0].attention.v_proj.weight])),
    ]:
        u, s, vh = torch.linalg.svd(weight.double())
        for rank in (1, 4, 12):
            best = (u[:, :rank] * s[:rank]) @ vh[:rank]
            torch.testing.assert_close(supernet.super_layer(group).dense_weight(rank).double(), best, atol=1e-5, rtol=0)


def test_official_fold_puts_singular_values_in_fc2_up():
    supernet = FloraSupernetForImageClassification.from_dense(make_model("vit"), fold_singular_values="official")
    fc2, fc1 = supernet.super_layer("vit.layers.0.mlp.fc2"), supernet.super_layer("vit.layers.0.mlp.fc1")
    eye = torch.eye(fc2.down.weight.shape[0])
    torch.testing.assert_close(fc2.down.weight @ fc2.down.weight.T, eye, atol=1e-5, rtol=0)  # orthonormal rows
    torch.testing.assert_close(fc1.up.weight.T @ fc1.up.weight, torch.eye(fc1.up.weight.shape[1]), atol=1e-5, rtol=0)
    with pytest.raises(SearchSpaceError, match="fold_singular_values"):
        FloraSupernetForImageClassification.from_dense(make_model("vit"), fold_singular_values="sideways")


def test_subnet_changes_forward_and_gradients_stay_in_slice():
    supernet = FloraSupernetForImageClassification.from_dense(make_model("vit")).train()
    x = pixel_values(supernet.model)
    full = logits(supernet, x)
    subnet = supernet.space.min_subnet()
    supernet.set_subnet(subnet)
    assert supernet.active_subnet == subnet
    assert not torch.allclose(logits(supernet, x), full)
    supernet(pixel_values=x).logits.sum().backward()
    layer = supernet.super_layer("vit.layers.0.mlp.fc1")
    rank = layer.rank
    assert layer.down.weight.grad[:rank].abs().sum() > 0
    assert layer.down.weight.grad[rank:].abs().sum() == 0


def test_invalid_subnet_is_rejected():
    supernet = FloraSupernetForImageClassification.from_dense(make_model("vit"))
    other = FloraSearchSpace.from_model(make_model("swin")).max_subnet()
    with pytest.raises(SearchSpaceError, match="not in this search space"):
        supernet.set_subnet(other)


def test_supernet_save_load_round_trip(tmp_path, kind):
    supernet = FloraSupernetForImageClassification.from_dense(make_model(kind))
    filtered = supernet.space.with_block_choices([[(1.0, 1.0, 1.0), (0.25, 0.5, 0.125)]] * len(supernet.space.blocks))
    supernet = FloraSupernetForImageClassification.from_dense(make_model(kind), space=filtered)
    supernet.save_pretrained(tmp_path)
    loaded = FloraSupernetForImageClassification.from_pretrained(tmp_path)
    assert loaded.space == filtered
    subnet = filtered.sample(random.Random(0))
    supernet.set_subnet(subnet)
    loaded.set_subnet(subnet)
    x = pixel_values(supernet.model)
    torch.testing.assert_close(logits(loaded, x), logits(supernet, x), atol=1e-6, rtol=0)  # sdpa vs eager


def test_loading_bad_checkpoints(tmp_path):
    dense = make_model("vit")
    dense.save_pretrained(tmp_path / "dense")
    with pytest.raises(CheckpointError, match="holds a 'vit' checkpoint, not a flora-hf supernet"):
        FloraSupernetForImageClassification.from_pretrained(tmp_path / "dense")
    supernet = FloraSupernetForImageClassification.from_dense(dense)
    supernet.save_pretrained(tmp_path / "super")
    weights = tmp_path / "super" / "model.safetensors"
    weights.write_bytes(b"not a safetensors file" * 4)
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        FloraSupernetForImageClassification.from_pretrained(tmp_path / "super")
    with pytest.raises(CheckpointError, match="does not exist"):
        FloraSupernetForImageClassification.from_pretrained(tmp_path / "nowhere")
