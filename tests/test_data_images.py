"""Image data: Fashion-MNIST IDX files (damaged ones included) and ImageNet-style class folders."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from effml.data.images import (FASHION_MNIST_FILES, DataUnavailableError, ImageBatches, ImageFolderBatches,
                               ImageFolderSplit, eval_image_batches, load_fashion_mnist, read_idx)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def write_images(folder: Path, names: tuple[str, ...]) -> None:
    """Small RGB, grey and RGBA images (Pillow) named ``names`` in ``folder``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(names):
        shape = ((20, 30, 3), (20, 30), (20, 30, 4))[index % 3]
        Image.fromarray(np.full(shape, 40 * index, np.uint8)).save(folder / name)


# ------------------------------------------------------------------------------------------------ Fashion-MNIST


def test_a_truncated_gzip_idx_file_is_a_data_error_naming_the_file_and_the_fix(tmp_path) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", 20), ("test", 10)):
        write_idx(tmp_path / FASHION_MNIST_FILES[f"{split}_images"], rng.integers(0, 256, (count, 28, 28)))
        write_idx(tmp_path / FASHION_MNIST_FILES[f"{split}_labels"], rng.integers(0, 10, count))
    assert len(load_fashion_mnist(tmp_path, valid_size=5).train_images) == 15
    damaged = tmp_path / FASHION_MNIST_FILES["test_labels"]
    damaged.write_bytes(damaged.read_bytes()[:-12])  # a download or copy cut short: the gzip stream ends early

    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz is cut short or corrupt"):
        read_idx(damaged)
    with pytest.raises(DataUnavailableError, match="t10k-labels-idx1-ubyte.gz") as caught:
        load_fashion_mnist(tmp_path, valid_size=5)
    message = str(caught.value)
    assert "--reinstall dataset-fashion-mnist" in message and "data_dir" in message


def test_an_idx_file_with_a_short_body_is_reported_with_the_fix(tmp_path) -> None:
    images = np.zeros((3, 28, 28))
    for key, name in FASHION_MNIST_FILES.items():
        write_idx(tmp_path / name, images if "images" in key else np.zeros(3))
    header = bytes([0, 0, 0x08, 3]) + b"".join(int(n).to_bytes(4, "big") for n in (3, 28, 28))
    with gzip.open(tmp_path / FASHION_MNIST_FILES["train_images"], "wb") as handle:
        handle.write(header + bytes(100))  # a complete gzip stream whose IDX body is short
    with pytest.raises(DataUnavailableError, match=r"header promises shape \(3, 28, 28\).*dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path, valid_size=1)


# ------------------------------------------------------------------------------------------------ class folders


def test_an_evaluation_split_takes_the_training_splits_labels(tmp_path) -> None:
    for name in ("cat", "dog", "eel"):
        write_images(tmp_path / "train" / name, ("a.png", "b.png"))
    for name in ("dog", "eel"):  # val lacks 'cat': numbered on its own, dog would be 0
        write_images(tmp_path / "val" / name, ("a.png",))
    train = ImageFolderSplit(tmp_path / "train", size=8, resize=10)
    val = ImageFolderSplit(tmp_path / "val", size=8, resize=10, classes=train.classes)
    assert train.classes == val.classes == ["cat", "dog", "eel"]
    assert {path.parent.name: label for path, label in val.files} == {"dog": 1, "eel": 2}
    images, labels = val.batch(np.arange(len(val)))
    assert images.shape == (2, 3, 8, 8) and labels.tolist() == [1, 2]


def test_a_class_folder_unknown_to_training_is_refused(tmp_path) -> None:
    write_images(tmp_path / "train" / "cat", ("a.png",))
    write_images(tmp_path / "val" / "cat", ("a.png",))
    write_images(tmp_path / "val" / "yak", ("a.png",))
    train = ImageFolderSplit(tmp_path / "train")
    with pytest.raises(ValueError, match=r"\['yak'\].*training split"):
        ImageFolderSplit(tmp_path / "val", classes=train.classes)


def test_only_visible_image_files_become_classes_and_images(tmp_path) -> None:
    write_images(tmp_path / "cat", ("a.png", "b.JPG", "c.TIFF", ".hidden.jpeg"))
    write_images(tmp_path / "dog", ("a.PNG",))
    write_images(tmp_path / ".ipynb_checkpoints", ("a.png",))
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "cat" / "labels.csv").write_text("a,b")
    (tmp_path / ".DS_Store").write_text("junk")
    (tmp_path / "cat" / "sub.png").mkdir()  # a folder with an image's name is not an image
    split = ImageFolderSplit(tmp_path, size=8, resize=8)
    assert split.classes == ["cat", "dog"]
    assert sorted((path.parent.name, path.name) for path, _ in split.files) == [
        ("cat", "a.png"), ("cat", "b.JPG"), ("cat", "c.TIFF"), ("dog", "a.PNG")]
    images, labels = split.batch(np.arange(len(split)))  # every listed file decodes
    assert images.shape == (4, 3, 8, 8) and sorted(labels.tolist()) == [0, 0, 0, 1]


def test_a_class_folder_without_images_fails_at_construction(tmp_path) -> None:
    write_images(tmp_path / "cat", ("a.png",))
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"dog holds no image.*\.jpg"):
        ImageFolderSplit(tmp_path)


def test_batch_size_above_the_image_count_is_refused_at_construction(tmp_path) -> None:
    write_images(tmp_path / "cat", ("a.png", "b.png", "c.png"))
    split = ImageFolderSplit(tmp_path, size=8, resize=8)
    with pytest.raises(ValueError, match="batch_size 4 exceeds the 3 training images"):
        ImageFolderBatches(split, batch_size=4, seed=0)
    with pytest.raises(ValueError, match="batch_size 4 exceeds the 3 training images"):
        ImageBatches(np.zeros((3, 28, 28), np.uint8), np.zeros(3, np.int64), batch_size=4, seed=0)
    images, labels = ImageFolderBatches(split, batch_size=3, seed=0).batch(0)
    assert images.shape == (3, 3, 8, 8) and labels.tolist() == [0, 0, 0]


def test_evaluation_batches_of_the_ranks_partition_the_split() -> None:
    images, labels = np.arange(37 * 4, dtype=np.uint8).reshape(37, 2, 2), np.arange(37)
    seen = sorted(int(label) for rank in range(3)
                  for _, batch_labels in eval_image_batches(images, labels, 5, rank, 3) for label in batch_labels)
    assert seen == list(range(37))
