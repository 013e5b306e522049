"""Publishing compact FLORA / SPViT models: a model card built from structured data, and a thin push to the Hub.

The card's YAML metadata comes only from `huggingface_hub.ModelCardData` (never hand-written YAML, a known cause
of "YAML Metadata Error" on the Hub); its body is the jinja template `flora_model_card.md`, shipped in the
`flora_hf.hub_cards` package. `push_to_hub` only checks the folder and calls an `HfApi`-like object, so tests
can hand it a fake or point a real `HfApi` at a local stub, and every Hub failure becomes one `HubError`.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, constants
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from transformers import PreTrainedModel

from .checkpoints import COMPACT_MODEL_TYPES, checkpoint_model_type
from .errors import CheckpointError, FloraError, HubError, SearchSpaceError
from .macs import count_macs, count_params

CARD_TEMPLATE = "flora_model_card.md"
CARD_TAGS = ("flora", "low-rank", "vision-transformer", "image-classification")
SPVIT_TAGS = ("spvit", "pruning")
GROUP_KINDS = ("qkv", "fc1", "fc2")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
ARCHITECTURE_NAMES = {"vit": "ViT", "deit": "DeiT", "deit_distilled": "DeiT (with distillation head)", "swin": "Swin"}


class HubApi(Protocol):
    """The two `huggingface_hub.HfApi` methods `push_to_hub` uses; tests pass a recording fake."""

    def create_repo(self, repo_id: str, **kwargs: Any) -> Any: ...

    def upload_folder(self, **kwargs: Any) -> Any: ...


# model card ---------------------------------------------------------------------------------------------------
def card_template(name: str = CARD_TEMPLATE) -> str:
    """A packaged card template: `hub_cards/<name>` in the source tree, `flora_hf/hub_cards/<name>` installed."""
    return resources.files("flora_hf.hub_cards").joinpath(name).read_text(encoding="utf-8")


def render_model_card(
    compact: PreTrainedModel,
    *,
    base_model: str | None,
    dataset: str,
    accuracy: float | None,
    dense_accuracy: float | None,
    dense_macs: int,
    dense_params: int,
    search_settings: Mapping[str, Any] | None = None,
    subnet: Mapping[str, float] | None = None,
    repo_id: str | None = None,
    dataset_split: str = "test",
) -> str:
    """The README.md of a compact model: Hub metadata, cost and accuracy against the dense model, rank map.

    `base_model` is the dense model's Hub id (None when it has none); `dataset` a dataset name; accuracies are
    top-1 in [0, 1] on `dataset_split`; `dense_macs` / `dense_params` are per image, as `count_macs` /
    `count_params` give them. `repo_id` names the model and goes into the usage snippets. `search_settings`
    (e.g. MACs budget, population, generations) and the searched `subnet` ({group: ratio}) are shown as given.
    Assign the result to `compact.model_card` and `save_pretrained` writes it as README.md.
    """
    ranks = getattr(compact.config, "flora_ranks", None) or {}
    ops = getattr(compact.config, "spvit_ops", None) or {}
    if not ranks and not ops:
        raise CheckpointError(
            f"{type(compact).__name__} is not a compact flora-hf model: its config has no flora_ranks or spvit_ops"
        )
    for name, value in (("accuracy", accuracy), ("dense_accuracy", dense_accuracy)):
        if value is not None and not 0.0 <= value <= 1.0:
            raise FloraError(f"{name}={value!r}: accuracies are fractions in [0, 1], not percentages")
    for name, value in (("dense_macs", dense_macs), ("dense_params", dense_params)):
        if value <= 0:
            raise FloraError(f"{name}={value!r}: the dense model's cost must be a positive count")
    if subnet is not None and set(subnet) - set(ranks):
        raise SearchSpaceError(f"subnet names groups the model does not have: {sorted(set(subnet) - set(ranks))}")

    method = " + ".join(name for name, present in (("SPViT", ops), ("FLORA", ranks)) if present)
    architecture = compact.config.model_type.removeprefix("flora_").removeprefix("spvit_")
    suffix = method.lower().replace(" + ", "-")
    model_name = repo_id.rpartition("/")[2] if repo_id else f"{(base_model or architecture).rpartition('/')[2]}-{suffix}"
    eval_results = None
    if accuracy is not None:
        eval_results = [
            EvalResult(
                task_type="image-classification",
                task_name="Image Classification",
                dataset_type=dataset,
                dataset_name=dataset,
                dataset_split=dataset_split,
                metric_type="accuracy",
                metric_name="Top-1 accuracy",
                metric_value=accuracy,
            )
        ]
    card_data = ModelCardData(
        base_model=base_model,
        datasets=[dataset],
        eval_results=eval_results,
        library_name="transformers",
        metrics=["accuracy"] if eval_results else None,
        model_name=model_name if eval_results else None,
        pipeline_tag="image-classification",
        tags=[*CARD_TAGS, *(SPVIT_TAGS if ops else ())],
    )
    macs, params = count_macs(compact), count_params(compact)
    image_size = compact.config.image_size
    card = ModelCard.from_template(
        card_data,
        template_str=card_template(),
        model_name=model_name,
        model_id=repo_id or "path/to/this/model",
        base_model=base_model,
        architecture=ARCHITECTURE_NAMES.get(architecture, architecture),
        image_size="×".join(map(str, (image_size, image_size) if isinstance(image_size, int) else image_size)),
        comparison=[
            _cost_row("MACs per image", dense_macs, macs),
            _cost_row("Parameters", dense_params, params),
            _accuracy_row(f"Top-1 accuracy ({dataset}, {dataset_split})", dense_accuracy, accuracy),
        ],
        method=method,
        spvit_rows=_spvit_rows(compact.config) if ops else None,
        rank_rows=_rank_rows(ranks, subnet) if ranks else None,
        has_ratios=subnet is not None,
        low_rank_count=sum(rank is not None for rank in ranks.values()),
        group_count=len(ranks),
        search_settings=[{"name": _cell(key), "value": _cell(value)} for key, value in (search_settings or {}).items()],
        subnet_json=json.dumps(dict(subnet), indent=2) if subnet else None,
    )
    return str(card)


def _si(count: int) -> str:
    """17_580_000_000 -> "17.58 G": counts as people read them in tables."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return str(count)


def _cost_row(name: str, dense: int, flora: int) -> dict[str, str]:
    share = flora / dense
    return {"name": name, "dense": _si(dense), "flora": _si(flora), "change": f"{share:.1%} ({share - 1:+.1%})"}


def _accuracy_row(name: str, dense: float | None, flora: float | None) -> dict[str, str]:
    change = f"{100 * (flora - dense):+.2f} pt" if dense is not None and flora is not None else "n/a"
    return {"name": name, "dense": _percent(dense), "flora": _percent(flora), "change": change}


def _percent(accuracy: float | None) -> str:
    return "not measured" if accuracy is None else f"{accuracy:.2%}"


def _rank_rows(ranks: Mapping[str, int | None], subnet: Mapping[str, float] | None) -> list[dict[str, str]]:
    """One row per block (`<block>.attention.qkv`, `<block>.mlp.fc1`, `<block>.mlp.fc2`), in forward order."""
    blocks: dict[str, dict[str, str]] = {}
    for group, rank in ranks.items():
        parent, _, kind = group.rpartition(".")
        cell = "dense" if rank is None else str(rank)
        if subnet is not None and group in subnet:
            cell += f" ({float(subnet[group])})"
        blocks.setdefault(parent.rpartition(".")[0], {})[kind] = cell
    return [{"block": block, **{kind: cells.get(kind, "n/a") for kind in GROUP_KINDS}}
            for block, cells in blocks.items()]


def _spvit_rows(config) -> list[dict[str, str]]:
    sizes = config.spvit_mlp_sizes or {}
    return [{"block": block, "op": op, "units": str(sizes.get(block, config.intermediate_size))}
            for block, op in config.spvit_ops.items()]


def _cell(value: Any) -> str:
    """A markdown table cell: strings as they are, anything else as compact JSON; pipes escaped."""
    text = value if isinstance(value, str) else json.dumps(value, separators=(", ", ": "))
    return text.replace("|", "\\|")


# push ---------------------------------------------------------------------------------------------------------
def check_compact_folder(folder: str | os.PathLike) -> Path:
    """Raises `CheckpointError` unless `folder` holds a saved compact flora-hf model (config.json + safetensors)."""
    path = Path(folder)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory: push a folder written by a compact model's save_pretrained")
    model_type = checkpoint_model_type(path)
    if model_type not in COMPACT_MODEL_TYPES:
        raise CheckpointError(
            f"{path} holds a {model_type!r} checkpoint, not a flora-hf compact model "
            f"({' / '.join(COMPACT_MODEL_TYPES)})"
        )
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise CheckpointError(f"{path} has no model.safetensors: save the compact model with save_pretrained first")
    return path


def _connection_errors() -> tuple[type[BaseException], ...]:
    """Exceptions meaning "the Hub was not reached", across the HTTP clients huggingface_hub versions use."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError, OfflineModeIsEnabled]
    for module, name in (
        ("httpx2", "TransportError"),
        ("httpx", "TransportError"),
        ("requests", "ConnectionError"),
        ("requests", "Timeout"),
    ):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except ImportError:
            continue
    return tuple(errors)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload compact flora-hf model",
    api: HubApi | None = None,
) -> str:
    """Creates `repo_id` (if needed) and uploads the compact model in `folder`; returns the commit URL.

    The token is `token`, else whatever huggingface_hub finds (`HF_TOKEN`, `hf auth login`). `api` defaults
    to `HfApi()`; pass `HfApi(endpoint=...)` for a private Hub. Raises `CheckpointError` before any request
    when `folder` is not a compact FLORA checkpoint, and `HubError` when the Hub is unreachable or refuses.
    """
    path = check_compact_folder(folder)
    api = HfApi() if api is None else api
    endpoint = getattr(api, "endpoint", None) or constants.ENDPOINT
    try:
        api.create_repo(repo_id, token=token, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            folder_path=str(path), repo_id=repo_id, repo_type="model", token=token, commit_message=commit_message
        )
    except HfHubHTTPError as error:
        detail = _first_line(error)
        if error.server_message:
            detail += f" ({error.server_message.strip().splitlines()[0]})"
        if error.response is not None and error.response.status_code in (401, 403):
            detail += "; pass token=..., set HF_TOKEN or run `hf auth login` with a token that can write there"
        raise HubError(f"the Hugging Face Hub at {endpoint} refused to publish {repo_id}: {detail}") from error
    except ValueError as error:
        if not isinstance(error.__cause__, HfHubHTTPError):  # a local mistake, e.g. a malformed repo id
            raise
        # the Hub's validate-yaml endpoint rejected the card metadata (huggingface_hub re-raises it as ValueError)
        raise HubError(f"the Hugging Face Hub at {endpoint} rejected the model card of {repo_id}: {error}") from error
    except _connection_errors() as error:
        raise HubError(f"could not reach the Hugging Face Hub at {endpoint}: {_first_line(error)}") from error
    return getattr(commit, "commit_url", None) or str(commit)
