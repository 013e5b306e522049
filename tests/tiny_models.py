"""Tiny random transformers classifiers shared by the tests (no downloads)."""

import torch
from transformers import (
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    SwinConfig,
    SwinForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

VIT_KWARGS = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
                  patch_size=4, num_labels=5)
SWIN_KWARGS = dict(image_size=32, patch_size=2, embed_dim=16, depths=[1, 2], num_heads=[2, 4], window_size=4,
                   num_labels=5)


def make_model(kind: str, seed: int = 0, **overrides):
    """A tiny random classifier in eval mode with eager attention (so FlopCounterMode sees the matmuls)."""
    torch.manual_seed(seed)
    if kind == "vit":
        model = ViTForImageClassification(ViTConfig(**{**VIT_KWARGS, **overrides}))
    elif kind == "deit":
        model = DeiTForImageClassification(DeiTConfig(**{**VIT_KWARGS, **overrides}))
    elif kind == "deit-distilled":
        model = DeiTForImageClassificationWithTeacher(DeiTConfig(**{**VIT_KWARGS, **overrides}))
    elif kind == "swin":
        model = SwinForImageClassification(SwinConfig(**{**SWIN_KWARGS, **overrides}))
    else:
        raise ValueError(kind)
    model.set_attn_implementation("eager")
    return model.eval()


def pixel_values(model, batch: int = 2, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    size = model.config.image_size
    return torch.randn(batch, model.config.num_channels, size, size, generator=generator)


KINDS = ["vit", "deit", "deit-distilled", "swin"]

