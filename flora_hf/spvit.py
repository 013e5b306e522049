"""The SPViT single-path supernet: every MSA layer also holds two bottleneck convolutions made of its own weights.

Per MSA layer, SPViT ("Pruning Self-attentions into Convolutional Layers in Single Path") searches one of four
nested ops -- skip, 1x1 bottleneck conv, 3x3 bottleneck conv, MSA -- with three binary gates (at least 1x1 conv,
at least 3x3 conv, MSA), and every MLP's width with one binary gate per hidden unit. The convolutions own no
weights of their own beyond a head-mixing matrix and a BatchNorm: kernel position p of a conv uses a learnable
convex combination over heads of the MSA's per-head value projections (conv input side) and output projections
(conv output side), so the whole space is one path through the pretrained parameters.

Swin runs the convolutions inside each attention window (zero-padded at the window's border; on the shifted
windows of SW-MSA layers, without the shift mask), as SPViT's search does; the exported model keeps that form.

Gates are straight-through relaxed Bernoulli samples of learnable logits in training (one sample per forward,
shared by the batch; drawn from a seeded generator so every process draws the same), `logit > 0` in eval.
Logits start at 1.5, so in eval the supernet is the dense model.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel, SwinForImageClassification

from .errors import SearchSpaceError, UnsupportedModelError
from .modeling_spvit import SPVIT_CLASSES, SPVIT_OPS, grid_to_tokens, num_prefix_tokens, tokens_to_grid
from .wrapped_classifier import WrappedClassifierModel

SPVIT_SUPERNET_MODEL_TYPE = "spvit_supernet"
KERNEL_POSITIONS = 9  # a 3x3 kernel, positions in row-major order; the centre is position 4
CENTER = 4


def default_alpha(model: nn.Module) -> float:
    """SPViT's head-mixing temperature: 0.01 for ViT / DeiT, 100 for Swin (official settings)."""
    return 100.0 if isinstance(model, SwinForImageClassification) else 0.01


def straight_through_bernoulli(logits: torch.Tensor, noise: torch.Tensor, temperature: float) -> torch.Tensor:
    """Binary sample of sigmoid(logits) (relaxed Bernoulli / Gumbel-sigmoid); gradients flow through the relaxation."""
    noise = noise.clamp(1e-6, 1 - 1e-6)
    relaxed = torch.sigmoid((noise.log() - (-noise).log1p() + logits) / temperature)
    return (relaxed > 0.5).to(logits.dtype) - relaxed.detach() + relaxed


def straight_through_indicator(logits: torch.Tensor) -> torch.Tensor:
    """`sigmoid(logits) > 0.5` (the eval decision) with the smooth gradient of sigmoid(sigmoid(logits) - 0.5).

    What the MACs loss sees: the architecture the gates would choose now, as a function the logits can move.
    """
    probability = torch.sigmoid(logits)
    smooth = torch.sigmoid(probability - 0.5)
    return (probability > 0.5).to(logits.dtype) - smooth.detach() + smooth


class Gated(nn.Module):
    """Base of the gated modules: learnable gate logits, sampled in training, thresholded in eval."""

    def __init__(self, size: int, init: float, temperature: float) -> None:
        super().__init__()
        self.gate_logits = nn.Parameter(torch.full((size,), float(init)))
        self.temperature = temperature
        self.noise: torch.Tensor | None = None  # U(0, 1) draws for the next training forward, set by the supernet

    def gates(self) -> torch.Tensor:
        if not self.training:
            return (self.gate_logits > 0).to(self.gate_logits.dtype)
        noise = self.noise if self.noise is not None else torch.rand_like(self.gate_logits)
        self.noise = None
        return straight_through_bernoulli(self.gate_logits, noise.to(self.gate_logits), self.temperature)


class SPViTGatedActivation(Gated):
    """An MLP's activation followed by one keep-gate per hidden unit (SPViT prunes units after the activation)."""

    def __init__(self, activation: nn.Module, hidden_units: int, init: float, temperature: float) -> None:
        super().__init__(hidden_units, init, temperature)
        self.activation = activation

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(hidden_states) * self.gates()

    def kept_units(self) -> list[int]:
        return torch.nonzero(self.gate_logits > 0).flatten().tolist()


class SPViTSearchAttention(Gated):
    """An MSA layer and the 1x1 / 3x3 bottleneck convolutions built from its value and output projections.

    Output: `g3 * MSA + g2 (1 - g3) * conv3x3 + g1 (1 - g2)(1 - g3) * conv1x1` with `g = cumprod(gates)`; in eval
    only the chosen op runs.
    """

    def __init__(self, attention: nn.Module, num_prefix_tokens: int, alpha: float, init: float, temperature: float) -> None:
        super().__init__(3, init, temperature)
        self.msa = attention
        self.num_prefix_tokens = num_prefix_tokens
        self.alpha = alpha
        self.num_heads, self.head_dim = attention.num_attention_heads, attention.head_dim
        self.head_logits = nn.Parameter(torch.ones(self.num_heads, KERNEL_POSITIONS))
        self.norm1 = nn.BatchNorm2d(self.head_dim)
        self.norm3 = nn.BatchNorm2d(self.head_dim)

    # the convolutions ---------------------------------------------------------------------------------------
    def position_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per kernel position p: value projection (head_dim, hidden), its bias and output projection (hidden, head_dim).

        Each is `sum_h a[h, p] * <head h's slice>` with `a = softmax over heads of head_logits / alpha`.
        """
        mix = torch.softmax(self.head_logits / self.alpha, dim=0)  # (heads, positions)
        value, output = self.msa.v_proj, self.msa.o_proj
        value_weight = value.weight.view(self.num_heads, self.head_dim, -1)
        value_in = torch.einsum("hp,hoi->poi", mix, value_weight)
        bias = value.bias if value.bias is not None else value.weight.new_zeros(value.out_features)
        value_bias = mix.T @ bias.view(self.num_heads, self.head_dim)
        output_weight = output.weight.view(output.out_features, self.num_heads, self.head_dim)
        value_out = torch.einsum("hp,ohd->pod", mix, output_weight)
        return value_in, value_bias, value_out

    def conv_parameters(self, kernel_size: int) -> dict[str, torch.Tensor]:
        """Weights of the equivalent `Conv2d(hidden, head_dim, k)` and `Conv2d(head_dim, hidden, 1)`."""
        value_in, value_bias, value_out = self.position_weights()
        if kernel_size == 1:
            positions = slice(CENTER, CENTER + 1)
        else:
            positions = slice(None)
        value_in, value_out = value_in[positions], value_out[positions]
        in_weight = value_in.permute(1, 2, 0).reshape(self.head_dim, -1, kernel_size, kernel_size)
        return {
            "conv_in.weight": in_weight,
            "conv_in.bias": value_bias[positions].sum(0),
            "conv_out.weight": value_out.sum(0)[:, :, None, None],
            "conv_out.bias": self.msa.o_proj.bias,
        }

    def conv(self, hidden_states: torch.Tensor, kernel_size: int) -> torch.Tensor:
        """The bottleneck conv op on the patch grid; prefix tokens pass through unchanged."""
        parameters = self.conv_parameters(kernel_size)
        norm = self.norm1 if kernel_size == 1 else self.norm3
        prefix, patches = hidden_states.split(
            [self.num_prefix_tokens, hidden_states.shape[1] - self.num_prefix_tokens], dim=1
        )
        grid = F.conv2d(tokens_to_grid(patches), parameters["conv_in.weight"], parameters["conv_in.bias"],
                        padding=kernel_size // 2)
        grid = F.conv2d(F.relu(norm(grid)), parameters["conv_out.weight"], parameters["conv_out.bias"])
        return torch.cat([prefix, grid_to_tokens(grid)], dim=1)

    # the single path ----------------------------------------------------------------------------------------
    def path_gates(self) -> torch.Tensor:
        """(g1, g2, g3) = cumprod of the three gates; in training, a gate implied by a larger op gets no gradient."""
        g1, g2, g3 = torch.cumprod(self.gates(), dim=0).unbind()
        if self.training and bool(g2 == 1):
            g1 = g1.detach()  # SPViT slows the gradient of less complex gates down
            if bool(g3 == 1):
                g2 = g2.detach()
        return torch.stack([g1, g2, g3])

    def op(self) -> str:
        """The op the gates choose in eval."""
        return SPVIT_OPS[int((self.gate_logits > 0).to(torch.int64).cumprod(0).sum())]

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs) -> tuple[torch.Tensor, None]:
        if not self.training:
            op = self.op()
            if op == "msa":
                return self.msa(hidden_states, attention_mask, **kwargs)
            if op == "skip":
                return torch.zeros_like(hidden_states), None
            return self.conv(hidden_states, 1 if op == "conv1x1" else 3), None
        g1, g2, g3 = self.path_gates()
        msa = self.msa(hidden_states, attention_mask, **kwargs)[0]
        conv3, conv1 = self.conv(hidden_states, 3), self.conv(hidden_states, 1)
        return g3 * msa + g2 * (1 - g3) * conv3 + g1 * (1 - g2) * (1 - g3) * conv1, None


@dataclass(frozen=True)
class LayerCost:
    """MACs per image of one transformer layer's candidate ops, counted as `count_macs` counts them."""

    msa: int
    conv3x3: int
    conv1x1: int
    mlp_unit: int  # one MLP hidden unit: fc1 row + fc2 column over every token

    def attention(self, path_gates: torch.Tensor) -> torch.Tensor:
        g1, g2, g3 = path_gates.unbind()
        return g1 * self.conv1x1 + g2 * (self.conv3x3 - self.conv1x1) + g3 * (self.msa - self.conv3x3)


class SPViTSupernetConfig(PreTrainedConfig):
    """Configuration of an SPViT supernet.

    Args:
        base_config (`dict`): `to_dict()` of the dense classifier's config.
        base_architecture (`str`): class name of the dense classifier.
        dense_macs (`int`): MACs per image of the dense classifier.
        alpha (`float`): temperature of the softmax over heads that mixes them into kernel positions (official:
            0.01 for ViT / DeiT, 100 for Swin).
        gate_init (`float`): initial gate logit (official: 1.5, i.e. kept with probability 0.82).
        gate_temperature (`float`): temperature of the relaxed Bernoulli samples (official: 1).
    """

    model_type = SPVIT_SUPERNET_MODEL_TYPE
    base_config: dict | None = None
    base_architecture: str | None = None
    dense_macs: int | None = None
    alpha: float = 0.01
    gate_init: float = 1.5
    gate_temperature: float = 1.0


class SPViTSupernetForImageClassification(WrappedClassifierModel):
    """A dense ViT / DeiT / Swin classifier whose MSA layers and MLPs are gated SPViT search modules."""

    config_class = SPViTSupernetConfig
    supported_classes = tuple(SPVIT_CLASSES)
    description = "SPViT supernet"
    unsupported = "is not supported by SPViT: flora-hf prunes"

    def __init__(self, config: SPViTSupernetConfig, model: PreTrainedModel | None = None) -> None:
        super().__init__(config)
        if model is None:
            model = self.rebuild_classifier(config)
        check_spvit_supported(model)
        self.model = model
        prefix = num_prefix_tokens(model)
        self.layer_paths = []
        for path, layer in _transformer_layers(model):
            layer.attention = SPViTSearchAttention(layer.attention, prefix, config.alpha, config.gate_init,
                                                   config.gate_temperature)
            layer.mlp.activation_fn = SPViTGatedActivation(layer.mlp.activation_fn, layer.mlp.fc1.out_features,
                                                           config.gate_init, config.gate_temperature)
            self.layer_paths.append(path)
        self.gate_seed: int | None = None
        self._layer_costs: list[LayerCost] | None = None
        self.post_init()

    # construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, model: PreTrainedModel, alpha: float | None = None, gate_init: float = 1.5,
                   gate_temperature: float = 1.0) -> SPViTSupernetForImageClassification:
        """Wraps a copy of `model` (left untouched); in eval, with every gate on, it computes `model`'s logits.

        `alpha` defaults to the official value of the model's family (`default_alpha`).
        """
        from .macs import count_macs

        check_spvit_supported(model)
        if gate_init <= 0:
            raise SearchSpaceError(f"gate_init must be positive (every gate starts on), got {gate_init}")
        config = SPViTSupernetConfig(
            base_config=model.config.to_dict(), base_architecture=type(model).__name__, dense_macs=count_macs(model),
            alpha=default_alpha(model) if alpha is None else alpha, gate_init=gate_init, gate_temperature=gate_temperature,
        )
        supernet = cls(config, model=copy.deepcopy(model))
        reference = model.state_dict()
        with torch.no_grad():  # post_init re-initialized the new modules only; keep the dense weights exactly
            for key, value in supernet.model.state_dict().items():
                dense_key = key.replace(".attention.msa.", ".attention.")
                if dense_key in reference:
                    value.copy_(reference[dense_key])
        return supernet.train(model.training)

    # gates --------------------------------------------------------------------------------------------------
    def search_attentions(self) -> Iterator[tuple[str, SPViTSearchAttention]]:
        for path in self.layer_paths:
            yield path, self.model.get_submodule(path).attention

    def gated_activations(self) -> Iterator[tuple[str, SPViTGatedActivation]]:
        for path in self.layer_paths:
            yield path, self.model.get_submodule(path).mlp.activation_fn

    def gate_modules(self) -> list[Gated]:
        return [module for pairs in (self.search_attentions(), self.gated_activations()) for _, module in pairs]

    def architecture(self) -> dict[str, dict[str, Any]]:
        """The architecture the gates choose now: `{"ops": {layer: op}, "mlp_units": {layer: [kept units]}}`."""
        return {
            "ops": {path: module.op() for path, module in self.search_attentions()},
            "mlp_units": {path: module.kept_units() for path, module in self.gated_activations()},
        }

    def forward(self, pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None, **kwargs):
        if self.training:
            self._draw_gate_noise()
        return self.model(pixel_values=pixel_values, labels=labels, **kwargs)

    def _draw_gate_noise(self) -> None:
        """Draws this forward's gate samples; with `gate_seed` set they are a function of it (same on all processes)."""
        generator = None
        if self.gate_seed is not None:
            generator = torch.Generator().manual_seed(self.gate_seed)
        for module in self.gate_modules():
            module.noise = torch.rand(module.gate_logits.shape, generator=generator)

    # cost ---------------------------------------------------------------------------------------------------
    def layer_costs(self) -> list[LayerCost]:
        """Per layer, the MACs of each candidate op, from the shapes one batch-1 forward records (made once)."""
        if self._layer_costs is None:
            self._layer_costs = self._measure_layer_costs()
        return self._layer_costs

    @torch.no_grad()
    def _measure_layer_costs(self) -> list[LayerCost]:
        shapes: dict[str, torch.Size] = {}
        hooks = []

        def record(key: str):
            def hook(module, args, kwargs) -> None:
                shapes[key] = (args[0] if args else kwargs["hidden_states"]).shape
            return hook

        for path in self.layer_paths:
            layer = self.model.get_submodule(path)
            for name in ("attention", "mlp"):
                hooks.append(getattr(layer, name).register_forward_pre_hook(record(f"{path}.{name}"), with_kwargs=True))
        config, training = self.model.config, self.training
        size = config.image_size if isinstance(config.image_size, (tuple, list)) else (config.image_size,) * 2
        try:
            self.eval()
            self.model(pixel_values=torch.zeros(1, config.num_channels, *size, device=self.device, dtype=self.dtype))
        finally:
            self.train(training)
            for hook in hooks:
                hook.remove()
        costs = []
        for path, module in self.search_attentions():
            windows, length, hidden = shapes[f"{path}.attention"]  # ViT / DeiT: one "window" of every token
            tokens, inner, head_dim = windows * length, module.msa.q_proj.out_features, module.head_dim
            positions = windows * (length - module.num_prefix_tokens)
            costs.append(LayerCost(
                msa=4 * tokens * hidden * inner + 2 * tokens * length * inner,
                conv3x3=positions * (KERNEL_POSITIONS * hidden * head_dim + head_dim * hidden),
                conv1x1=positions * 2 * hidden * head_dim,
                mlp_unit=2 * shapes[f"{path}.mlp"][:-1].numel() * hidden,
            ))
        return costs

    def macs(self, soft: bool = False) -> torch.Tensor:
        """MACs per image of the architecture the gates choose; `soft=True` makes it differentiable in the logits."""
        costs = self.layer_costs()
        total = self.config.dense_macs - sum(c.msa + c.mlp_unit * m.gate_logits.numel()
                                             for c, (_, m) in zip(costs, self.gated_activations()))
        total = torch.tensor(float(total), device=self.device)
        for cost, (_, attention), (_, activation) in zip(costs, self.search_attentions(), self.gated_activations()):
            if soft:
                path_gates = torch.cumprod(straight_through_indicator(attention.gate_logits), dim=0)
                units = straight_through_indicator(activation.gate_logits).sum()
            else:
                path_gates = (attention.gate_logits > 0).float().cumprod(0)
                units = (activation.gate_logits > 0).sum()
            total = total + cost.attention(path_gates) + cost.mlp_unit * units
        return total

    def count_macs(self) -> int:
        """MACs per image of the pruned model `export_pruned` would build now (`flora_hf.count_macs` calls this)."""
        with torch.no_grad():
            return int(round(self.macs().item()))

    # export -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def export_pruned(self, architecture: dict[str, dict[str, Any]] | None = None, image_processor=None) -> PreTrainedModel:
        """A compact pruned classifier (convolutions folded, MLPs sliced) computing what the supernet computes in eval.

        `architecture` defaults to the gates' current choice; passing one (e.g. the searched architecture to a
        supernet freshly made from the dense model, as SPViT fine-tunes from the pretrained weights) exports that.
        """
        architecture = architecture or self.architecture()
        ops, units = self._check_architecture(architecture)
        state = {key: value for key, value in self.model.state_dict().items()
                 if "gate_logits" not in key and ".attention." not in key}
        for path, attention in self.search_attentions():
            op = ops[path]
            if op == "msa":
                state.update({f"{path}.attention.{k}": v for k, v in attention.msa.state_dict().items()})
            elif op != "skip":
                kernel_size = 1 if op == "conv1x1" else 3
                norm = attention.norm1 if kernel_size == 1 else attention.norm3
                state.update({f"{path}.attention.{k}": v for k, v in attention.conv_parameters(kernel_size).items()})
                state.update({f"{path}.attention.norm.{k}": v for k, v in norm.state_dict().items()})
        for path, _ in self.gated_activations():
            kept = torch.tensor(units[path], dtype=torch.long)
            for name, dim in (("fc1.weight", 0), ("fc1.bias", 0), ("fc2.weight", 1)):
                key = f"{path}.mlp.{name}"
                if key in state:
                    state[key] = state[key].index_select(dim, kept.to(state[key].device))
        compact_cls = SPVIT_CLASSES[type(self.model)]
        config_dict = {k: v for k, v in self.model.config.to_dict().items() if k not in ("model_type", "architectures")}
        config = compact_cls.config_class(**config_dict, spvit_ops=ops,
                                          spvit_mlp_sizes={path: len(kept) for path, kept in units.items()})
        compact = compact_cls(config)
        compact.load_state_dict({k: v.clone().contiguous() for k, v in state.items()}, strict=True)
        compact.image_processor = image_processor
        return compact.to(self.device, self.dtype).eval()

    def _check_architecture(self, architecture: dict[str, dict[str, Any]]) -> tuple[dict[str, str], dict[str, list[int]]]:
        """Validates an architecture against this supernet; the error names the first offending layer."""
        try:
            ops, units = dict(architecture["ops"]), {k: sorted(set(v)) for k, v in architecture["mlp_units"].items()}
        except (KeyError, TypeError, AttributeError) as error:
            raise SearchSpaceError(f"an SPViT architecture is {{'ops': ..., 'mlp_units': ...}}; got {architecture!r}") from error
        layers = set(self.layer_paths)
        for name, mapping in (("ops", ops), ("mlp_units", units)):
            if set(mapping) != layers:
                extra, missing = sorted(set(mapping) - layers), sorted(layers - set(mapping))
                raise SearchSpaceError(f"architecture {name} does not match this model: unknown layers {extra}, missing {missing}")
        for path, op in ops.items():
            if op not in SPVIT_OPS:
                raise SearchSpaceError(f"{path}: unknown op {op!r}; expected one of {SPVIT_OPS}")
        for path, activation in self.gated_activations():
            width = activation.gate_logits.numel()
            if any(not isinstance(u, int) or not 0 <= u < width for u in units[path]):
                raise SearchSpaceError(f"{path}: MLP units must be integers in [0, {width})")
        return ops, units


def check_spvit_supported(model: nn.Module) -> None:
    if type(model) not in SPVIT_CLASSES:
        raise UnsupportedModelError(
            f"{type(model).__name__} is not supported by SPViT: flora-hf prunes the transformers classifiers "
            f"{', '.join(cls.__name__ for cls in SPVIT_CLASSES)}."
        )


def _transformer_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, layer) of every transformer layer (a module with an `attention` and an `mlp`), in forward order."""
    return [(path, module) for path, module in model.named_modules()
            if hasattr(module, "attention") and hasattr(module, "mlp")]

