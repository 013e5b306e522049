"""Image-classification datasets as Hugging Face ``datasets`` objects.

Every loader returns a :class:`datasets.DatasetDict` with exactly the splits ``train``,
``validation`` and ``test``, whose items are ``{"pixel_values": FloatTensor[3, H, W],
"labels": int}``, so search, training and evaluation never care where the images came from.
"""

from __future__ import annotations

import functools
import os
import re

import datasets
import numpy as np
import PIL.Image
import torch
import transformers
from datasets import ClassLabel, DatasetDict
from datasets.packaged_modules.imagefolder.imagefolder import IMAGE_EXTENSIONS
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from transformers.image_processing_utils import BaseImageProcessor
from transformers.utils import is_torchvision_available

from .errors import FloraError

_VALIDATION_NAMES = ("validation", "valid", "val", "dev")
_IMAGE_COLUMN_NAMES = ("image", "img")
_LABEL_COLUMN_NAMES = ("label", "labels", "fine_label")
# "name" or "owner/name"; anything else that is not a directory can only be a mistyped path.
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


class DataError(FloraError):
    """A dataset source that cannot be turned into train/validation/test image splits (a ValueError)."""


def load_image_dataset(
    source: str,
    image_processor: BaseImageProcessor,
    *,
    seed: int = 0,
    validation_fraction: float = 0.2,
    test_fraction: float = 0.2,
) -> DatasetDict:
    """Load ``source`` as ``train``/``validation``/``test`` splits of preprocessed images.

    ``source`` is ``"digits"`` (scikit-learn's bundled 8x8 digits, works offline), a local
    directory in ``imagefolder`` layout (one subfolder per class, optionally under
    ``train/``, ``validation/``, ``test/``) or a Hub dataset name. Splits the source lacks are
    carved out of its train split with a seeded, stratified (when possible) split, taking
    ``validation_fraction``/``test_fraction`` of the train rows, so the same seed always
    gives the same split.

    Digits are preprocessed once and stored as tensors because they are reused for many
    epochs. Other sources keep their images and run ``image_processor`` on access via
    ``with_transform``; their only columns are ``image`` and ``labels``, so a ``Trainer``
    needs ``remove_unused_columns=False`` to keep the ``image`` column for the transform.
    """
    if not (0 < validation_fraction < 1 and 0 < test_fraction < 1 and validation_fraction + test_fraction < 1):
        raise DataError(
            "validation_fraction and test_fraction must each be in (0, 1) and sum to less than 1 "
            f"to leave a non-empty train split; got {validation_fraction} and {test_fraction}"
        )
    if source == "digits":
        dataset = _complete_splits(
            DatasetDict(train=_preprocessed_digits(image_processor)), seed, validation_fraction, test_fraction
        )
        dataset.set_format("torch", columns=["pixel_values"], output_all_columns=True)
        return dataset
    dataset = _standardize(_load_raw(source))
    dataset = _complete_splits(dataset, seed, validation_fraction, test_fraction)
    return dataset.with_transform(functools.partial(_process_batch, image_processor))


def collate_image_batch(items: list[dict]) -> dict[str, torch.Tensor]:
    """Stack items into a model batch; usable as a ``Trainer`` ``data_collator``."""
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "labels": torch.tensor([int(item["labels"]) for item in items], dtype=torch.long),
    }


def make_image_processor(image_size: int) -> BaseImageProcessor:
    """ViT preprocessing for models trained from scratch here: resize, scale to [-1, 1], RGB.

    Returns ``ViTImageProcessor``, or its PIL twin ``ViTImageProcessorPil`` (same settings,
    same saved config) when torchvision is missing, instead of letting transformers fall
    back with a warning.
    """
    processor_class = (
        transformers.ViTImageProcessor if is_torchvision_available() else transformers.ViTImageProcessorPil
    )
    return processor_class(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )


def _preprocessed_digits(image_processor: BaseImageProcessor) -> datasets.Dataset:
    """All 1797 digits, run through the processor once (~1 s at 32x32 on 2 cores), not every epoch."""
    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)  # 0..16 grey levels -> 0..255
    images = [PIL.Image.fromarray(image).convert("RGB") for image in pixels]
    pixel_values = image_processor(images, return_tensors="pt")["pixel_values"].numpy()
    features = datasets.Features(
        {
            "pixel_values": datasets.Array3D(shape=pixel_values.shape[1:], dtype="float32"),
            "labels": ClassLabel(names=[str(name) for name in digits.target_names]),
        }
    )
    return datasets.Dataset.from_dict({"pixel_values": pixel_values, "labels": digits.target}, features=features)


def _load_raw(source: str) -> DatasetDict:
    """Load a local imagefolder or a Hub dataset, turning every failure into one DataError."""
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        if not any(
            os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS for _, _, names in os.walk(path) for name in names
        ):
            raise DataError(f"no image files found in directory {source!r}")
        try:
            return datasets.load_dataset("imagefolder", data_dir=path)
        except Exception as error:
            raise DataError(f"could not load image folder {source!r}: {error}") from error
    if source.startswith((".", "~", os.sep)) or not _HUB_ID.fullmatch(source):
        raise DataError(f"{source!r} is not an existing directory")
    try:
        return datasets.load_dataset(source)
    except Exception as error:
        raise DataError(
            f"could not load dataset {source!r} from the Hugging Face Hub ({error}); no local directory of "
            "that name exists. Offline, use 'digits' or a local imagefolder directory."
        ) from error


def _standardize(dataset: DatasetDict) -> DatasetDict:
    """Keep only an ``image`` column (decoded as RGB) and a ``labels`` ClassLabel column."""
    empty = [name for name, split in dataset.items() if split.num_rows == 0]
    if not dataset or empty:
        raise DataError(f"dataset is empty (empty splits: {empty})")
    features = next(iter(dataset.values())).features
    image_column = _find_column(features, datasets.Image, _IMAGE_COLUMN_NAMES)
    if image_column is None:
        raise DataError(f"no image column found (columns: {list(features)})")
    label_column = _find_column(features, ClassLabel, _LABEL_COLUMN_NAMES)
    if label_column is None:
        raise DataError(
            f"no label column found (columns: {list(features)}); an image folder needs one subfolder "
            "per class and at least 2 classes"
        )
    dataset = dataset.select_columns([image_column, label_column])
    dataset = dataset.rename_columns({image_column: "image", label_column: "labels"})
    try:
        dataset = dataset.cast_column("image", datasets.Image(mode="RGB"))
    except Exception as error:
        raise DataError(f"column {image_column!r} does not hold images: {error}") from error
    dataset = _as_class_labels(dataset, label_column)
    names = next(iter(dataset.values())).features["labels"].names
    if len(names) < 2:
        raise DataError(f"need at least 2 classes, found {len(names)}: {names}")
    return dataset


def _find_column(features: datasets.Features, feature_type: type, names: tuple[str, ...]) -> str | None:
    """First column of ``feature_type``, else the first column with a conventional name."""
    typed = [column for column, feature in features.items() if isinstance(feature, feature_type)]
    named = [name for name in names if name in features]
    return (typed + named + [None])[0]


def _as_class_labels(dataset: DatasetDict, original_name: str) -> DatasetDict:
    """Cast integer or string labels to one ClassLabel shared by all splits."""
    feature = next(iter(dataset.values())).features["labels"]
    if isinstance(feature, ClassLabel):
        return dataset
    dtype = getattr(feature, "dtype", None)
    values = set().union(*(split.unique("labels") for split in dataset.values()))
    if dtype in ("string", "large_string") and None not in values:  # datasets 5 reads CSV text as large_string
        names = sorted(values)
    elif isinstance(dtype, str) and dtype.startswith(("int", "uint")) and None not in values and min(values) >= 0:
        names = [str(value) for value in range(max(values) + 1)]
    else:
        raise DataError(
            f"label column {original_name!r} has type {feature}; expected class labels "
            "(ClassLabel, non-negative integers or strings, no missing values)"
        )
    return dataset.cast_column("labels", ClassLabel(names=names))


def _complete_splits(
    dataset: DatasetDict, seed: int, validation_fraction: float, test_fraction: float
) -> DatasetDict:
    """Return exactly train/validation/test, carving the missing ones out of train."""
    if "train" not in dataset:
        raise DataError(f"dataset has no 'train' split (splits: {list(dataset)})")
    train = dataset["train"]
    splits = {
        "validation": next((dataset[name] for name in _VALIDATION_NAMES if name in dataset), None),
        "test": dataset.get("test"),
    }
    fractions = {"validation": validation_fraction, "test": test_fraction}
    sizes = {name: max(1, round(fractions[name] * train.num_rows)) for name, split in splits.items() if split is None}
    if train.num_rows - sum(sizes.values()) < 1:
        carved = " and ".join(f"{size} {name}" for name, size in sizes.items())
        raise DataError(
            f"train split has only {train.num_rows} rows, too few to carve {carved} rows out of it "
            "and keep a non-empty train split"
        )
    labels = np.asarray(train["labels"])
    pool = np.arange(train.num_rows)
    for name, size in sizes.items():
        pool, taken = _carve(pool, labels, size, seed)
        splits[name] = train.select(np.sort(taken))
    return DatasetDict(train=train.select(np.sort(pool)), validation=splits["validation"], test=splits["test"])


def _carve(indices: np.ndarray, labels: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``size`` of ``indices`` off, stratified by label unless a class is too small for it."""
    try:
        return train_test_split(indices, test_size=size, random_state=seed, stratify=labels[indices])
    except ValueError:  # a class with a single row, or fewer carved rows than classes
        return train_test_split(indices, test_size=size, random_state=seed)


def _process_batch(image_processor: BaseImageProcessor, batch: dict[str, list]) -> dict[str, object]:
    """``with_transform`` hook: preprocess decoded images on access."""
    pixel_values = image_processor(batch["image"], return_tensors="pt")["pixel_values"]
    return {"pixel_values": pixel_values, "labels": batch["labels"]}
