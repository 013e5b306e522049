"""Loading checkpoints with one clear error for a missing, corrupt or foreign checkpoint."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError
from transformers import AutoModelForImageClassification

from .errors import CheckpointError
from .modeling_spvit import FLORA_SPVIT_CLASSES, SPVIT_CLASSES

SPVIT_MODEL_TYPES = tuple(cls.config_class.model_type for cls in (*SPVIT_CLASSES.values(), *FLORA_SPVIT_CLASSES.values()))
COMPACT_MODEL_TYPES = ("flora_vit", "flora_deit", "flora_deit_distilled", "flora_swin", *SPVIT_MODEL_TYPES)
DENSE_MODEL_TYPES = ("vit", "deit", "swin")
SUPERNET_MODEL_TYPE = "flora_supernet"


def checkpoint_model_type(path: str | os.PathLike) -> str | None:
    """The `model_type` in a local checkpoint's config.json (None for a Hub id, which transformers resolves)."""
    path = Path(path)
    if not path.exists():
        if _looks_like_hub_id(str(path)):
            return None
        raise CheckpointError(f"checkpoint {path} does not exist")
    config_file = path / "config.json"
    try:
        return json.loads(config_file.read_text()).get("model_type")
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a checkpoint directory: it has no config.json") from None
    except (ValueError, OSError, AttributeError) as error:
        raise CheckpointError(f"{config_file} is corrupt: {error}") from error


def expect_model_type(path: str | os.PathLike, expected: Iterable[str], what: str) -> None:
    """Raises unless the checkpoint at `path` is of one of the `expected` model types."""
    found = checkpoint_model_type(path)
    expected = tuple(expected)
    if found is not None and found not in expected:
        raise CheckpointError(
            f"{path} holds a {found!r} checkpoint, not a {what} ({' / '.join(expected)})"
        )


@contextmanager
def checkpoint_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turns the many ways loading can fail on bad files into one `CheckpointError` naming the checkpoint."""
    try:
        yield
    except CheckpointError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as error:
        raise CheckpointError(f"cannot load checkpoint {path}: {str(error).splitlines()[0] if str(error) else error!r}") from error


def _looks_like_hub_id(name: str) -> bool:
    """`owner/name` or a bare `name`; anything path-like that does not exist locally is an error instead."""
    return name.count("/") <= 1 and not name.startswith(("/", ".", "~"))


def load_classifier(path: str | os.PathLike, model_types: Iterable[str], what: str, **kwargs):
    """`AutoModelForImageClassification.from_pretrained` restricted to `model_types`, with clear errors."""
    expect_model_type(path, model_types, what)
    with checkpoint_errors(path):
        return AutoModelForImageClassification.from_pretrained(path, **kwargs)


def load_dense(path: str | os.PathLike, **kwargs):
    """A dense ViT / DeiT / Swin classifier from a local checkpoint or a Hub id."""
    return load_classifier(path, DENSE_MODEL_TYPES, "dense ViT / DeiT / Swin classifier", **kwargs)


def load_compact(path: str | os.PathLike, **kwargs):
    """A compact FLORA or SPViT model saved by `export_subnet(...)` / `export_pruned(...)` and `save_pretrained`."""
    return load_classifier(path, COMPACT_MODEL_TYPES, "flora-hf compact model", **kwargs)
