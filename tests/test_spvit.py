import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from tiny_models import make_model, pixel_values
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForImageClassification

from flora_hf import SPViTSupernetForImageClassification, count_macs, count_params
from flora_hf.checkpoints import load_compact
from flora_hf.errors import CheckpointError, SearchSpaceError, UnsupportedModelError
from flora_hf.modeling_spvit import SPVIT_CLASSES, BottleneckConvAttention, SkipAttention
from flora_hf.spvit import SPViTSearchAttention

SPVIT_KINDS = ["vit", "deit", "deit-distilled", "swin"]


def four_layer_model(kind: str):
    """A tiny classifier with four transformer layers (Swin: two stages of two, the second one shifted)."""
    return make_model(kind, **({"depths": [2, 2]} if kind == "swin" else {"num_hidden_layers": 4}))


def randomized_supernet(kind: str, seed: int = 0) -> SPViTSupernetForImageClassification:
    """A supernet whose gates choose a mix of ops and MLP widths, with non-trivial head mixing and BN statistics."""
    supernet = SPViTSupernetForImageClassification.from_dense(four_layer_model(kind))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for index, (_, attention) in enumerate(supernet.search_attentions()):
            op = index % 4  # skip, 1x1, 3x3, msa
            attention.gate_logits.copy_(torch.tensor([1.0 if i < op else -1.0 for i in range(3)]))
            attention.head_logits.normal_(0, 0.02, generator=generator)
            for norm in (attention.norm1, attention.norm3):
                norm.running_mean.normal_(0, 0.1, generator=generator)
                norm.running_var.uniform_(0.5, 2.0, generator=generator)
                norm.weight.normal_(1, 0.1, generator=generator)
        for _, activation in supernet.gated_activations():
            activation.gate_logits.normal_(0.5, 1.0, generator=generator)
    return supernet.eval()


@pytest.mark.parametrize("kind", SPVIT_KINDS)
def test_all_gates_on_reproduces_dense(kind):
    dense = make_model(kind)
    supernet = SPViTSupernetForImageClassification.from_dense(dense).eval()
    x = pixel_values(dense)
    with torch.no_grad():
        torch.testing.assert_close(supernet(pixel_values=x).logits, dense(pixel_values=x).logits, atol=1e-6, rtol=0)
    assert set(supernet.architecture()["ops"].values()) == {"msa"}
    assert count_macs(supernet) == count_macs(dense)
    assert all(torch.all(m.gate_logits == 1.5) for m in supernet.gate_modules())


def test_conv_ops_are_convolutions_of_the_msa_weights():
    supernet = randomized_supernet("deit")
    _, attention = next(supernet.search_attentions())
    msa, heads, head_dim = attention.msa, attention.num_heads, attention.head_dim
    hidden = msa.v_proj.in_features
    tokens = torch.randn(2, 2 + 16, hidden)  # DeiT: [CLS], distillation token, 4x4 patches
    grid = tokens[:, 2:].transpose(1, 2).reshape(2, hidden, 4, 4)
    mix = torch.softmax(attention.head_logits / attention.alpha, dim=0)  # (heads, 9 positions)
    value = msa.v_proj.weight.view(heads, head_dim, hidden)
    output = msa.o_proj.weight.view(hidden, heads, head_dim)
    value_bias = msa.v_proj.bias.view(heads, head_dim)
    for kernel_size, norm, positions in ((3, attention.norm3, range(9)), (1, attention.norm1, [4])):
        kernel = torch.zeros(head_dim, hidden, kernel_size, kernel_size)
        bias, out_weight = torch.zeros(head_dim), torch.zeros(hidden, head_dim)
        for p in positions:
            row, col = (p // 3, p % 3) if kernel_size == 3 else (0, 0)
            kernel[:, :, row, col] = sum(mix[h, p] * value[h] for h in range(heads))
            bias += sum(mix[h, p] * value_bias[h] for h in range(heads))
            out_weight += sum(mix[h, p] * output[:, h] for h in range(heads))
        hidden_grid = F.relu(norm(F.conv2d(grid, kernel, bias, padding=kernel_size // 2)))
        expected = F.conv2d(hidden_grid, out_weight[:, :, None, None], msa.o_proj.bias).flatten(2).transpose(1, 2)
        with torch.no_grad():
            result = attention.conv(tokens, kernel_size)
        torch.testing.assert_close(result[:, 2:], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(result[:, :2], tokens[:, :2])  # prefix tokens pass through


@pytest.mark.parametrize("logits, op", [((5, 5, 5), "msa"), ((5, 5, -5), "conv3x3"), ((5, -5, 5), "conv1x1"),
                                        ((-5, 5, 5), "skip")])
def test_single_path_output_in_training(logits, op):
    supernet = SPViTSupernetForImageClassification.from_dense(make_model("vit"))
    _, attention = next(supernet.search_attentions())
    tokens = torch.randn(2, 17, 32)
    attention.train()  # BatchNorm uses batch statistics in both computations
    with torch.no_grad():
        attention.gate_logits.copy_(torch.tensor(logits, dtype=torch.float))
        expected = {"msa": attention.msa(tokens)[0], "conv3x3": attention.conv(tokens, 3),
                    "conv1x1": attention.conv(tokens, 1), "skip": torch.zeros_like(tokens)}[op]
    attention.noise = torch.full((3,), 0.5)  # logit-noise 0: the sample is the sign of the logit
    output, _ = attention(tokens)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)
    (output * torch.randn_like(output)).sum().backward()
    assert attention.gate_logits.grad is not None and attention.gate_logits.grad.abs().sum() > 0
    assert attention.op() == op


def test_gate_samples_follow_the_seed():
    supernet = SPViTSupernetForImageClassification.from_dense(make_model("vit")).train()
    x = pixel_values(supernet.model)

    def logits(seed):
        supernet.gate_seed = seed
        with torch.no_grad():
            return supernet(pixel_values=x).logits

    torch.testing.assert_close(logits(3), logits(3))
    assert any(not torch.equal(logits(3), logits(s)) for s in range(4, 10))


@pytest.mark.parametrize("kind", SPVIT_KINDS)
def test_export_matches_supernet_and_counts(kind):
    supernet = randomized_supernet(kind)
    compact = supernet.export_pruned()
    assert type(compact) is SPVIT_CLASSES[type(supernet.model)]
    architecture = supernet.architecture()
    assert list(architecture["ops"].values()) == ["skip", "conv1x1", "conv3x3", "msa"]
    layers = [compact.get_submodule(path) for path in supernet.layer_paths]
    assert isinstance(layers[0].attention, SkipAttention)
    assert [layers[i].attention.conv_in.kernel_size for i in (1, 2)] == [(1, 1), (3, 3)]
    assert all(not hasattr(layers[i].attention, "q_proj") for i in (1, 2))
    sizes = [layer.mlp.fc1.out_features for layer in layers]
    dense_sizes = [four_layer_model(kind).get_submodule(path).mlp.fc1.out_features for path in supernet.layer_paths]
    assert sizes == [len(units) for units in architecture["mlp_units"].values()] and sizes != dense_sizes
    x = pixel_values(supernet.model)
    with torch.no_grad():
        torch.testing.assert_close(compact(pixel_values=x).logits, supernet(pixel_values=x).logits, atol=1e-5, rtol=0)
    compact.set_attn_implementation("eager")  # the flop counter does not see the CPU SDPA kernel
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        compact(pixel_values=x[:1])
    assert count_macs(compact) == count_macs(supernet) == counter.get_total_flops() // 2 < count_macs(four_layer_model(kind))
    assert count_params(supernet) == sum(p.numel() for p in compact.parameters())


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_exported_model_loads_three_ways(tmp_path, kind):
    from transformers import ViTImageProcessor

    supernet = randomized_supernet(kind)
    size = supernet.model.config.image_size
    compact = supernet.export_pruned(image_processor=ViTImageProcessor(size={"height": size, "width": size}))
    compact.save_pretrained(tmp_path / "model")
    files = {p.name for p in (tmp_path / "model").iterdir()}
    assert {"modeling_spvit.py", "modeling_flora.py", "config.json", "preprocessor_config.json"} <= files
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["spvit_ops"] == supernet.architecture()["ops"]
    x = pixel_values(supernet.model)
    with torch.no_grad():
        expected = compact(pixel_values=x).logits
        for loaded in (type(compact).from_pretrained(tmp_path / "model"),
                       AutoModelForImageClassification.from_pretrained(tmp_path / "model"),
                       load_compact(tmp_path / "model")):
            assert type(loaded) is type(compact)
            torch.testing.assert_close(loaded(pixel_values=x).logits, expected, atol=1e-5, rtol=0)
    from test_export import REMOTE_CODE_SCRIPT

    torch.save(x, tmp_path / "x.pt")
    torch.save(expected, tmp_path / "y.pt")
    (tmp_path / "load.py").write_text(REMOTE_CODE_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(tmp_path / "load.py"), str(tmp_path / "model"), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
        capture_output=True, text=True, cwd=tmp_path,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.startswith(("MAXDIFF", "LABEL")))
    assert float(lines["MAXDIFF"]) < 1e-5
    assert lines["LABEL"] in compact.config.id2label.values()


def test_searched_architecture_exports_from_fresh_dense_weights():
    searched = randomized_supernet("vit")
    fresh = SPViTSupernetForImageClassification.from_dense(four_layer_model("vit"))
    compact = fresh.export_pruned(searched.architecture())
    assert compact.config.spvit_ops == searched.architecture()["ops"]
    conv = compact.base_model.layers[2].attention
    assert isinstance(conv, BottleneckConvAttention)
    torch.testing.assert_close(conv.norm.running_var, torch.ones_like(conv.norm.running_var))  # fresh BN


def test_supernet_save_and_load(tmp_path):
    supernet = randomized_supernet("vit")
    supernet.save_pretrained(tmp_path)
    loaded = SPViTSupernetForImageClassification.from_pretrained(tmp_path).eval()
    assert loaded.architecture() == supernet.architecture()
    x = pixel_values(supernet.model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=x).logits, supernet(pixel_values=x).logits)
    make_model("vit").save_pretrained(tmp_path / "dense")
    with pytest.raises(CheckpointError, match="not a SPViT supernet"):
        SPViTSupernetForImageClassification.from_pretrained(tmp_path / "dense")


def test_swin_convolutions_stay_inside_their_window():
    """As in SPViT's search: a Swin conv op sees one attention window, zero-padded at its border."""
    supernet = randomized_supernet("swin")
    assert supernet.config.alpha == 100  # the official Swin head-mixing temperature
    path, attention = list(supernet.search_attentions())[2]  # conv3x3, in the second stage (8x8 map, 4x4 windows)
    windows = torch.randn(4, 16, attention.msa.v_proj.in_features)
    changed = windows.clone()
    changed[0] += 1.0
    with torch.no_grad():
        before, after = attention(windows)[0], attention(changed)[0]
    assert not torch.allclose(before[0], after[0])
    torch.testing.assert_close(before[1:], after[1:])


def test_bad_input_is_named():
    from transformers import ConvNextConfig, ConvNextForImageClassification

    convnext = ConvNextForImageClassification(ConvNextConfig(num_stages=2, depths=[1, 1], hidden_sizes=[8, 16], num_labels=2))
    with pytest.raises(UnsupportedModelError, match="ConvNextForImageClassification is not supported by SPViT"):
        SPViTSupernetForImageClassification.from_dense(convnext)
    supernet = SPViTSupernetForImageClassification.from_dense(make_model("vit"))
    architecture = supernet.architecture()
    with pytest.raises(SearchSpaceError, match="unknown op 'conv5x5'"):
        supernet.export_pruned({**architecture, "ops": {**architecture["ops"], "vit.layers.0": "conv5x5"}})
    with pytest.raises(SearchSpaceError, match="missing \\['vit.layers.1'\\]"):
        supernet.export_pruned({**architecture, "ops": {"vit.layers.0": "msa"}})
    with pytest.raises(SearchSpaceError, match="MLP units must be integers in \\[0, 64\\)"):
        supernet.export_pruned({**architecture, "mlp_units": {**architecture["mlp_units"], "vit.layers.0": [64]}})
    with pytest.raises(SearchSpaceError, match="no FLORA subnets"):
        count_macs(supernet, {"vit.layers.0.mlp.fc1": 0.5})


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_flora_decomposes_a_pruned_model(tmp_path, kind):
    from flora_hf import FloraSearchSpace, FloraSupernetForImageClassification

    searched = randomized_supernet(kind)
    pruned = searched.export_pruned()
    space = FloraSearchSpace.from_model(pruned)
    assert [block[0].name for block in space.blocks] == [f"{searched.layer_paths[3]}.attention.qkv"]  # the MSA left
    supernet = FloraSupernetForImageClassification.from_dense(pruned, space=space)
    x = pixel_values(pruned)
    with torch.no_grad():
        torch.testing.assert_close(supernet(pixel_values=x).logits, pruned(pixel_values=x).logits, atol=1e-5, rtol=0)
    subnet = space.min_subnet()
    supernet.set_subnet(subnet)
    compact = supernet.export_subnet(subnet)
    assert compact.config.spvit_ops == pruned.config.spvit_ops and compact.config.flora_ranks
    with torch.no_grad():
        torch.testing.assert_close(compact(pixel_values=x).logits, supernet(pixel_values=x).logits, atol=1e-5, rtol=0)
    assert count_macs(compact) == count_macs(supernet, subnet) < count_macs(pruned)
    compact.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert type(loaded) is type(compact)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=x).logits, compact(pixel_values=x).logits, atol=1e-5, rtol=0)


def test_gates_converge_toward_the_macs_target_on_digits(tmp_path):
    from flora_hf import SPViTTrainer, SPViTTrainingArguments
    from flora_hf.data import load_image_dataset, make_image_processor

    data = load_image_dataset("digits", make_image_processor(16), seed=0)
    supernet = SPViTSupernetForImageClassification.from_dense(make_model("vit", num_labels=10))
    args = SPViTTrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=3, learning_rate=1e-3, per_device_train_batch_size=64,
        lr_scheduler_type="constant", gate_learning_rate=0.1, macs_target=0.5, macs_loss_weight=20.0,
        logging_steps=10, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
    )
    trainer = SPViTTrainer(model=supernet, args=args, train_dataset=data["train"])
    groups = trainer.create_optimizer().param_groups
    assert groups[2]["lr"] == 0.1 and groups[2]["weight_decay"] == 0.0
    assert sum(p.numel() for p in groups[2]["params"]) == sum(m.gate_logits.numel() for m in supernet.gate_modules())
    trainer.train()
    fractions = [log["macs_fraction"] for log in trainer.state.log_history if "macs_fraction" in log]
    assert fractions[0] == 1.0
    assert abs(count_macs(supernet) / supernet.config.dense_macs - 0.5) < 0.1
    compact = supernet.eval().export_pruned()
    assert count_macs(compact) == count_macs(supernet)


def test_training_arguments_reject_bad_targets(tmp_path):
    from flora_hf import SPViTTrainingArguments

    with pytest.raises(ValueError, match="macs_target must be a fraction"):
        SPViTTrainingArguments(output_dir=str(tmp_path), macs_target=1.5)
    with pytest.raises(ValueError, match="gate_learning_rate must be positive"):
        SPViTTrainingArguments(output_dir=str(tmp_path), gate_learning_rate=0)
