"""scikit-learn's 8×8 digits (effml.data.images.load_digits): shapes and scaling, the seeded split, the upsampling,
the labels, and the errors for a missing scikit-learn and bad sizes."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from effml.data.images import DataUnavailableError, ImageBatches, ImageSplits, eval_image_batches, load_digits

DIGITS_COUNT = 1797


def _all_images(splits: ImageSplits) -> np.ndarray:
    return np.concatenate([splits.train_images, splits.valid_images, splits.test_images])


def _all_labels(splits: ImageSplits) -> np.ndarray:
    return np.concatenate([splits.train_labels, splits.valid_labels, splits.test_labels])


@pytest.fixture(scope="module")
def sklearn_digits():
    """sklearn's ``Bunch`` of the digits (images (1797, 8, 8) float 0–16, target (1797,))."""
    datasets = pytest.importorskip("sklearn.datasets")
    return datasets.load_digits()


@pytest.fixture(scope="module")
def digits16(sklearn_digits) -> ImageSplits:
    return load_digits()


@pytest.fixture(scope="module")
def digits8(sklearn_digits) -> ImageSplits:
    return load_digits(size=8)


def test_splits_have_the_requested_sizes_shapes_dtypes_and_value_range(digits16: ImageSplits) -> None:
    assert digits16.test_images.shape == (360, 16, 16) and digits16.valid_images.shape == (200, 16, 16)
    assert digits16.train_images.shape == (DIGITS_COUNT - 560, 16, 16)
    assert digits16.num_classes == 10
    for images, labels in ((digits16.train_images, digits16.train_labels),
                           (digits16.valid_images, digits16.valid_labels),
                           (digits16.test_images, digits16.test_labels)):
        assert images.dtype == np.uint8 and labels.dtype == np.int64 and labels.shape == (len(images),)
        assert set(np.unique(labels)) <= set(range(10))
    images = _all_images(digits16)
    assert images.min() == 0 and images.max() == 255  # sklearn's digits use the full 0–16 range


def test_size_8_is_sklearns_images_scaled_to_0_255_in_permutation_order(sklearn_digits, digits8: ImageSplits) -> None:
    order = np.random.default_rng(0).permutation(DIGITS_COUNT)
    expected = np.rint(sklearn_digits.images * 255 / 16).astype(np.uint8)
    np.testing.assert_array_equal(digits8.test_images, expected[order[:360]])
    np.testing.assert_array_equal(digits8.valid_images, expected[order[360:560]])
    np.testing.assert_array_equal(digits8.train_images, expected[order[560:]])


def test_labels_are_sklearns_targets_of_the_chosen_rows(sklearn_digits, digits8: ImageSplits) -> None:
    order = np.random.default_rng(0).permutation(DIGITS_COUNT)
    np.testing.assert_array_equal(_all_labels(digits8), sklearn_digits.target[np.concatenate([order[560:],
                                                                                             order[360:560],
                                                                                             order[:360]])])


def test_the_splits_partition_all_images_without_overlap(sklearn_digits, digits8: ImageSplits) -> None:
    # Compare rows with their labels: sklearn's digits hold no duplicate (image, label) pair, so the three splits
    # together must hold each of its rows exactly once.
    def rows(images: np.ndarray, labels: np.ndarray) -> list[bytes]:
        return [image.tobytes() + bytes([label]) for image, label in zip(images, labels, strict=True)]

    expected = np.rint(sklearn_digits.images * 255 / 16).astype(np.uint8)
    every_row = rows(expected, sklearn_digits.target)
    assert len(set(every_row)) == DIGITS_COUNT
    split_rows = [set(rows(getattr(digits8, f"{name}_images"), getattr(digits8, f"{name}_labels")))
                  for name in ("train", "valid", "test")]
    assert sum(len(part) for part in split_rows) == DIGITS_COUNT
    assert set.union(*split_rows) == set(every_row)


def test_the_same_seed_gives_the_same_split_and_another_seed_a_different_one(digits16: ImageSplits) -> None:
    again, other = load_digits(seed=0), load_digits(seed=1)
    for name in ("train_images", "train_labels", "valid_images", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(again, name), getattr(digits16, name))
    assert not np.array_equal(other.test_images, digits16.test_images)
    # A different split of the same images: the union is unchanged.
    assert np.array_equal(np.sort(_all_images(other).reshape(DIGITS_COUNT, -1), axis=0),
                          np.sort(_all_images(digits16).reshape(DIGITS_COUNT, -1), axis=0))


def _bilinear_double(images: np.ndarray, axis: int) -> np.ndarray:
    """×2 bilinear upsampling along ``axis`` with align_corners=False: output pixel o samples source coordinate
    o/2 − 1/4, so pixel 2k is ¼·x[k−1] + ¾·x[k] and pixel 2k+1 is ¾·x[k] + ¼·x[k+1], the border pixel repeated."""
    padded = np.pad(images, [(1, 1) if dim == axis else (0, 0) for dim in range(images.ndim)], mode="edge")
    length = images.shape[axis]
    shifted = [np.take(padded, np.arange(length) + offset, axis=axis) for offset in range(3)]
    even, odd = 0.25 * shifted[0] + 0.75 * shifted[1], 0.75 * shifted[1] + 0.25 * shifted[2]
    return np.stack([even, odd], axis=axis + 1).reshape(*images.shape[:axis], 2 * length, *images.shape[axis + 1:])


def test_size_16_is_the_bilinear_doubling_of_sklearns_images(sklearn_digits, digits16: ImageSplits) -> None:
    upsampled = _bilinear_double(_bilinear_double(sklearn_digits.images, axis=1), axis=2)
    expected = np.rint(upsampled * 255 / 16).astype(np.uint8)
    order = np.random.default_rng(0).permutation(DIGITS_COUNT)
    np.testing.assert_array_equal(digits16.test_images, expected[order[:360]])
    np.testing.assert_array_equal(digits16.train_images, expected[order[560:]])


def test_upsampling_keeps_each_images_mean_intensity_and_the_split(digits8: ImageSplits,
                                                                    digits16: ImageSplits) -> None:
    means8 = _all_images(digits8).astype(np.float64).mean(axis=(1, 2))
    means16 = _all_images(digits16).astype(np.float64).mean(axis=(1, 2))
    # Bilinear ×2 (align_corners=False) weighs each source pixel equally except at the border; rounding to uint8
    # moves a mean by < 0.5. Measured: at most 0.08 of 255.
    np.testing.assert_allclose(means16, means8, atol=0.5)
    np.testing.assert_array_equal(_all_labels(digits16), _all_labels(digits8))
    assert load_digits(size=24).train_images.shape[1:] == (24, 24)


def test_the_existing_image_batches_read_the_digits(digits16: ImageSplits) -> None:
    images, labels = ImageBatches(digits16.train_images, digits16.train_labels, batch_size=32, seed=0).batch(3)
    assert images.shape == (32, 1, 16, 16) and labels.shape == (32,)
    assert images.min() >= -1.0 and images.max() <= 1.0
    batches = list(eval_image_batches(digits16.test_images, digits16.test_labels, batch_size=100))
    assert [len(labels) for _, labels in batches] == [100, 100, 100, 60]


def test_a_missing_scikit_learn_is_a_data_error_naming_the_fix(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(DataUnavailableError, match=r"pip install 'effml\[images\]'.*pip install scikit-learn"):
        load_digits()


@pytest.mark.parametrize(("arguments", "message"), [
    ({"size": 12}, "size 12 must be a positive multiple of 8"),
    ({"size": 0}, "size 0 must be a positive multiple of 8"),
    ({"valid_size": -1}, "valid_size -1 must be at least 0"),
    ({"test_size": -5}, "test_size -5 must be at least 0"),
    ({"valid_size": 1000, "test_size": 797}, r"797 \+ 1000 = 1797 must be in \[0, 1796\]"),
])
def test_bad_sizes_are_value_errors_naming_the_value_and_the_range(sklearn_digits, arguments: dict,
                                                                   message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_digits(**arguments)


def test_the_largest_allowed_held_out_share_leaves_one_training_image(sklearn_digits) -> None:
    splits = load_digits(size=8, valid_size=0, test_size=DIGITS_COUNT - 1)
    assert len(splits.train_images) == 1 and len(splits.valid_images) == 0
