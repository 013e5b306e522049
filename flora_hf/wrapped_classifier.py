"""What the FLORA and SPViT supernets share: a `PreTrainedModel` around a stock transformers classifier.

A supernet's config keeps the classifier's own config (`base_config`) and class name (`base_architecture`), so
`from_pretrained` rebuilds the classifier from config and loads the checkpoint's weights into it.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn
from transformers import AutoConfig, PreTrainedConfig, PreTrainedModel

from .checkpoints import checkpoint_errors, expect_model_type
from .errors import UnsupportedModelError


class WrappedClassifierModel(PreTrainedModel):
    """Base of the supernets: the wrapped classifier is `self.model`.

    Subclasses set `config_class`, `supported_classes` (the classifier classes they wrap), `description` (what
    checkpoint errors call theirs) and `unsupported` (the error text after an unsupported class name).
    """

    base_model_prefix = "model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supported_classes: Iterable[type[PreTrainedModel]] = ()
    description = "supernet"
    unsupported = "is not supported"

    def _init_weights(self, module: nn.Module) -> None:
        self.model._init_weights(module)

    @classmethod
    def rebuild_classifier(cls, config: PreTrainedConfig) -> PreTrainedModel:
        """The classifier a saved supernet wraps, rebuilt from its config (weights come from the checkpoint)."""
        if not config.base_config or not config.base_architecture:
            raise UnsupportedModelError("supernet config lacks base_config / base_architecture")
        supported = {model_class.__name__: model_class for model_class in cls.supported_classes}
        if config.base_architecture not in supported:
            raise UnsupportedModelError(f"{config.base_architecture} {cls.unsupported} {', '.join(supported)}")
        base_config = dict(config.base_config)
        return supported[config.base_architecture](AutoConfig.for_model(base_config.pop("model_type"), **base_config))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Loads a saved supernet; a missing, corrupt or foreign checkpoint raises `CheckpointError`."""
        expect_model_type(pretrained_model_name_or_path, [cls.config_class.model_type], cls.description)
        with checkpoint_errors(pretrained_model_name_or_path):
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """Saves with keys equal to module paths (no legacy renaming), so `Trainer` resume can load them as is."""
        kwargs.setdefault("save_original_format", False)
        super().save_pretrained(save_directory, *args, **kwargs)
