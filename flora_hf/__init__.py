"""flora-hf: FLORA low-rank architecture search for Hugging Face vision transformers."""

from transformers import AutoConfig, AutoModelForImageClassification

from .errors import CheckpointError, FloraError, HubError, SearchSpaceError, UnsupportedModelError
from .evaluation import evaluate_accuracy
from .filtering import filter_search_space
from .macs import count_macs, count_params
from .modeling_flora import COMPACT_CLASSES
from .modeling_spvit import FLORA_SPVIT_CLASSES, SPVIT_CLASSES
from .search import Candidate, SearchResult, evolutionary_search, random_search
from .search_space import FloraSearchSpace
from .spvit import SPViTSupernetConfig, SPViTSupernetForImageClassification
from .spvit_trainer import SPViTTrainer, SPViTTrainingArguments
from .supernet import FloraSupernetConfig, FloraSupernetForImageClassification
from .trainer import DistillationTrainer, FloraTrainer, FloraTrainingArguments

__version__ = "0.1.0"


def _register_auto_classes() -> None:
    """`import flora_hf` makes the Auto classes know compact models; `save_pretrained` writes their auto_map."""
    for compact_cls in (*COMPACT_CLASSES.values(), *SPVIT_CLASSES.values(), *FLORA_SPVIT_CLASSES.values()):
        config_cls = compact_cls.config_class
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForImageClassification.register(config_cls, compact_cls, exist_ok=True)
        config_cls.register_for_auto_class()
        compact_cls.register_for_auto_class("AutoModelForImageClassification")
    for supernet_config in (FloraSupernetConfig, SPViTSupernetConfig):
        AutoConfig.register(supernet_config.model_type, supernet_config, exist_ok=True)


_register_auto_classes()

__all__ = [
    "Candidate",
    "CheckpointError",
    "DistillationTrainer",
    "FloraError",
    "FloraSearchSpace",
    "FloraSupernetConfig",
    "FloraSupernetForImageClassification",
    "FloraTrainer",
    "FloraTrainingArguments",
    "HubError",
    "SPViTSupernetConfig",
    "SPViTSupernetForImageClassification",
    "SPViTTrainer",
    "SPViTTrainingArguments",
    "SearchResult",
    "SearchSpaceError",
    "UnsupportedModelError",
    "count_macs",
    "count_params",
    "evaluate_accuracy",
    "evolutionary_search",
    "filter_search_space",
    "random_search",
]
