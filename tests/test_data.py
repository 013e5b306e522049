"""Tests for flora_hf.data: digits, imagefolder and Hub loading, splits, errors, collation."""

from collections import Counter

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from sklearn.datasets import load_digits

from flora_hf.data import DataError, collate_image_batch, load_image_dataset, make_image_processor

RED, BLUE = (200, 10, 10), (10, 10, 200)


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path, monkeypatch):
    """Keep imagefolder Arrow caches out of the user's ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


@pytest.fixture(scope="module")
def processor8():
    return make_image_processor(8)


@pytest.fixture(scope="module")
def digits8(processor8):
    """Digits at their native 8x8, where preprocessing can be inverted to recover the raw images."""
    return load_image_dataset("digits", processor8)


def _raw_rows(split) -> Counter:
    """Multiset of (8x8 uint8 image bytes, label) recovered from preprocessed 8x8 digits."""
    pixels = split[:]["pixel_values"][:, 0].numpy()
    raw = np.rint((pixels * 0.5 + 0.5) * 255).astype(np.uint8)
    return Counter(zip((image.tobytes() for image in raw), split["labels"]))


def _save_images(folder, color, count, mode="RGB"):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        PIL.Image.new("RGB", (5 + i, 4), color).convert(mode).save(folder / f"{i}.png")


def _assert_labels_match_colors(split):
    """Red images must be labelled 'cat' and blue ones 'dog'."""
    names = split.features["labels"].names
    for item in split:
        red, _, blue = item["pixel_values"].mean(dim=(1, 2)).tolist()
        assert names[item["labels"]] == ("cat" if red > blue else "dog")


def test_digits_splits_partition_the_dataset(digits8):
    assert list(digits8) == ["train", "validation", "test"]
    sizes = {name: split.num_rows for name, split in digits8.items()}
    assert sizes == {"train": 1079, "validation": 359, "test": 359}

    digits = load_digits()
    raw = np.round(digits.images * (255 / 16)).astype(np.uint8)
    expected = Counter(zip((image.tobytes() for image in raw), digits.target.tolist()))
    recovered = sum((_raw_rows(split) for split in digits8.values()), Counter())
    assert recovered == expected  # every row exactly once, so splits are disjoint


def test_digits_splits_are_stratified(digits8):
    totals = Counter(load_digits().target.tolist())
    for name, fraction in (("train", 0.6), ("validation", 0.2), ("test", 0.2)):
        counts = Counter(digits8[name]["labels"])
        assert set(counts) == set(range(10))
        for label, total in totals.items():
            assert abs(counts[label] - fraction * total) <= 2


def test_digits_split_is_seeded(digits8, processor8):
    again = load_image_dataset("digits", processor8, seed=0)
    other = load_image_dataset("digits", processor8, seed=1)
    for name in digits8:
        assert torch.equal(again[name][:]["pixel_values"], digits8[name][:]["pixel_values"])
        assert list(again[name]["labels"]) == list(digits8[name]["labels"])
    assert _raw_rows(other["test"]) != _raw_rows(digits8["test"])


def test_digits_items_and_label_names():
    dataset = load_image_dataset("digits", make_image_processor(32), validation_fraction=0.1, test_fraction=0.3)
    assert {name: split.num_rows for name, split in dataset.items()} == {"train": 1078, "validation": 180, "test": 539}
    assert dataset["train"].features["labels"].names == [str(i) for i in range(10)]
    item = dataset["validation"][0]
    assert item["pixel_values"].shape == (3, 32, 32)
    assert item["pixel_values"].dtype == torch.float32
    assert type(item["labels"]) is int
    assert -1.0 <= item["pixel_values"].min() < item["pixel_values"].max() <= 1.0


def test_imagefolder_without_splits_gets_three_stratified_splits(tmp_path, processor8):
    _save_images(tmp_path / "cat", RED, 6)
    _save_images(tmp_path / "dog", BLUE, 6, mode="L")  # greyscale still yields 3 channels
    dataset = load_image_dataset(str(tmp_path), processor8)
    assert {name: split.num_rows for name, split in dataset.items()} == {"train": 8, "validation": 2, "test": 2}
    assert dataset["train"].features["labels"].names == ["cat", "dog"]
    for split in dataset.values():
        assert set(split["labels"]) == {0, 1}
        assert split[0]["pixel_values"].shape == (3, 8, 8)
        _assert_labels_match_colors(split)


def test_imagefolder_uses_given_test_and_val_splits(tmp_path, processor8):
    for class_name, color in (("cat", RED), ("dog", BLUE)):
        _save_images(tmp_path / "with_test" / "train" / class_name, color, 6)
        _save_images(tmp_path / "with_test" / "test" / class_name, color, 3)
        _save_images(tmp_path / "with_val" / "train" / class_name, color, 6)
        _save_images(tmp_path / "with_val" / "val" / class_name, color, 4)

    with_test = load_image_dataset(str(tmp_path / "with_test"), processor8)
    assert {name: split.num_rows for name, split in with_test.items()} == {"train": 10, "validation": 2, "test": 6}
    _assert_labels_match_colors(with_test["test"])

    with_val = load_image_dataset(str(tmp_path / "with_val"), processor8)
    assert {name: split.num_rows for name, split in with_val.items()} == {"train": 10, "validation": 8, "test": 2}
    _assert_labels_match_colors(with_val["validation"])


def test_imagefolder_metadata_string_labels_become_class_labels(tmp_path, processor8):
    rows = ["file_name,label"]
    for i in range(8):
        PIL.Image.new("RGB", (4, 4)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{'ab'[i % 2]}")
    (tmp_path / "metadata.csv").write_text("\n".join(rows) + "\n")
    dataset = load_image_dataset(str(tmp_path), processor8)
    assert dataset["train"].features["labels"].names == ["a", "b"]
    assert sum(split.num_rows for split in dataset.values()) == 8


def test_hub_dataset_columns_and_split_names_are_normalised(monkeypatch, processor8):
    features = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=["x", "y"])})

    def fake_load_dataset(name):
        assert name == "someone/tiny"
        images = [PIL.Image.new("L", (3, 3), 255 * (i % 2)) for i in range(10)]
        split = datasets.Dataset.from_dict({"img": images, "fine_label": [i % 2 for i in range(10)]}, features)
        return datasets.DatasetDict(train=split, valid=split.select(range(4)))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dataset = load_image_dataset("someone/tiny", processor8)
    assert {name: split.num_rows for name, split in dataset.items()} == {"train": 8, "validation": 4, "test": 2}
    assert dataset["test"].features["labels"].names == ["x", "y"]
    assert dataset["test"][0]["pixel_values"].shape == (3, 8, 8)


def test_hub_failure_is_explained(monkeypatch, processor8):
    def unreachable(name):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DataError, match="could not load dataset 'someone/missing'.*'digits'"):
        load_image_dataset("someone/missing", processor8)


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({}, "no image files found"),
        ({"": 4}, "no label column"),  # images but no class subfolders
        ({"cat": 4}, "no label column"),  # a single class subfolder
        ({"cat": 1, "dog": 1}, "too few to carve"),
    ],
)
def test_bad_imagefolders_raise(tmp_path, processor8, layout, message):
    for class_name, count in layout.items():
        _save_images(tmp_path / "data" / class_name, RED, count)
    (tmp_path / "data").mkdir(exist_ok=True)
    with pytest.raises(DataError, match=message):
        load_image_dataset(str(tmp_path / "data"), processor8)


@pytest.mark.parametrize("source", ["./no-such-dir", "/no/such/dir", "a/b/c"])
def test_missing_local_path_raises(processor8, source):
    with pytest.raises(DataError, match="is not an existing directory"):
        load_image_dataset(source, processor8)


@pytest.mark.parametrize(("validation", "test"), [(0.0, 0.2), (0.5, 0.5), (1.2, 0.1), (0.2, -0.1)])
def test_bad_fractions_raise(processor8, validation, test):
    with pytest.raises(DataError, match="non-empty train split"):
        load_image_dataset("digits", processor8, validation_fraction=validation, test_fraction=test)


def test_collate_image_batch():
    items = [{"pixel_values": torch.full((3, 4, 4), float(i)), "labels": i} for i in range(3)]
    items.append({"pixel_values": torch.zeros(3, 4, 4), "labels": torch.tensor(1)})
    batch = collate_image_batch(items)
    assert batch["pixel_values"].shape == (4, 3, 4, 4)
    assert batch["pixel_values"][2].eq(2.0).all()
    assert batch["labels"].dtype == torch.long
    assert batch["labels"].tolist() == [0, 1, 2, 1]


def test_make_image_processor_scales_to_unit_range():
    processor = make_image_processor(16)
    images = [PIL.Image.new("L", (5, 7), 255), PIL.Image.new("RGB", (9, 3), (0, 0, 0))]
    pixel_values = processor(images, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (2, 3, 16, 16)
    assert torch.allclose(pixel_values[0], torch.ones(3, 16, 16))
    assert torch.allclose(pixel_values[1], -torch.ones(3, 16, 16))
