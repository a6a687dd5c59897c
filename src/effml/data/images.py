"""Image-classification data without torchvision: Fashion-MNIST from IDX files, ImageNet-style class folders, batches.

Fashion-MNIST (Xiao, Rasul, Vollgraf, arXiv 1708.07747) is read from the four gzip'd IDX files Debian's
``dataset-fashion-mnist`` package installs under ``/usr/share/datasets/fashion-mnist`` (no download). Another
directory holding the same four files can be given as an argument or through ``$EFFML_FASHION_MNIST``.
IDX layout: a big-endian header (magic, then one 4-byte size per dimension: 16 bytes for images (N, 28, 28),
8 bytes for labels (N,)), then unsigned bytes.

``ImageBatches`` is a pure function of the step index (a random sample of examples seeded by (seed, step)), as the
trainer's exact resume and DDP sharding need. ``ImageFolderSplit`` reads ``root/<class>/<image>`` folders
(ImageNet's layout) with Pillow, resized and centre-cropped; like torchvision's ``ImageFolder`` it takes only files
with an image extension (``IMAGE_EXTENSIONS``) and skips hidden entries, and an evaluation split takes its labels
from the training split's class list (``classes=train.classes``), so both number the classes alike.

``load_digits`` gives scikit-learn's bundled 8×8 handwritten digits (no download), upsampled to 16×16 by default, as
uint8 images like Fashion-MNIST's, split by a seeded permutation into train, validation and test.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from effml.data.batches import rank_batch_ranges, rank_share

__all__ = ["FASHION_MNIST_DIR", "FASHION_MNIST_FILES", "ImageSplits", "read_idx", "fashion_mnist_dir",
           "load_fashion_mnist", "ImageBatches", "eval_image_batches", "ImageFolderSplit", "ImageFolderBatches",
           "DataUnavailableError", "IMAGE_EXTENSIONS", "load_digits", "images_to_tensor"]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {"train_images": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
                       "test_images": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz"}
_IDX_TYPES = {0x08: np.uint8}
#: File extensions ``ImageFolderSplit`` reads (compared case-insensitively), as torchvision's ``ImageFolder``.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_FASHION_MNIST_FIX = (
    "Install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu; files land in "
    "/usr/share/datasets/fashion-mnist; `apt-get install --reinstall dataset-fashion-mnist` restores damaged files), "
    "or point $EFFML_FASHION_MNIST (or the recipe's data_dir: --set data_dir=DIR) to a directory holding the four "
    "intact IDX .gz files.")


class DataUnavailableError(FileNotFoundError):
    """A data set is not on this machine; the message says how to get it."""


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """An (optionally gzip'd) IDX file of unsigned bytes as an array of the shape its header states.

    Raises ValueError naming ``path`` when the file is not such an IDX file, or is cut short or corrupt (a gzip
    stream that ends early or fails its checks), rather than the decompressor's bare EOFError.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise ValueError(f"{path} is cut short or corrupt ({type(error).__name__}: {error}).") from error
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (bad magic number {data[:4].hex()}).")
    n_dims = data[3]
    header = 4 + 4 * n_dims
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(n_dims))
    values = np.frombuffer(data, dtype=np.uint8, offset=header)
    if values.size != int(np.prod(shape)):
        raise ValueError(f"{path}: the header promises shape {shape} but {values.size} values follow.")
    return values.reshape(shape)


@dataclass(frozen=True)
class ImageSplits:
    """uint8 images (N, H, W) and int64 labels (N,) of each split (how ``valid`` is made: see each loader)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    valid_images: np.ndarray
    valid_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int


def fashion_mnist_dir(root: str | os.PathLike[str] | None = None) -> Path:
    """The directory Fashion-MNIST is read from: ``root``, else ``$EFFML_FASHION_MNIST``, else
    ``/usr/share/datasets/fashion-mnist``; ``DataUnavailableError`` naming the Debian package and the override when one
    of its four files is missing (a cheap check: the files are not read)."""
    directory = Path(root or os.environ.get("EFFML_FASHION_MNIST") or FASHION_MNIST_DIR)
    missing = [name for name in FASHION_MNIST_FILES.values() if not (directory / name).is_file()]
    if missing:
        raise DataUnavailableError(
            f"Fashion-MNIST is not in {directory} (missing {', '.join(missing)}). {_FASHION_MNIST_FIX}")
    return directory


def load_fashion_mnist(root: str | os.PathLike[str] | None = None, valid_size: int = 5000) -> ImageSplits:
    """Fashion-MNIST from ``fashion_mnist_dir(root)``.

    The last ``valid_size`` training images become the validation split (0: none). Raises ``DataUnavailableError``
    naming the Debian package and the override when a file is missing, cut short or not an IDX file.
    """
    directory = fashion_mnist_dir(root)
    try:
        arrays = {key: read_idx(directory / name) for key, name in FASHION_MNIST_FILES.items()}
    except ValueError as error:
        raise DataUnavailableError(f"Fashion-MNIST in {directory} is damaged: {error} {_FASHION_MNIST_FIX}") from error
    train_images, train_labels = arrays["train_images"], arrays["train_labels"].astype(np.int64)
    if not 0 <= valid_size < len(train_images):
        raise ValueError(f"valid_size {valid_size} must be in [0, {len(train_images)}) for {directory}.")
    cut = len(train_images) - valid_size
    labels = np.concatenate([train_labels, arrays["test_labels"]])
    return ImageSplits(train_images[:cut], train_labels[:cut], train_images[cut:], train_labels[cut:],
                       arrays["test_images"], arrays["test_labels"].astype(np.int64), int(labels.max()) + 1)


def _check_batch_size(batch_size: int, available: int) -> None:
    """Raise ValueError unless a batch of ``batch_size`` distinct examples can be drawn from ``available``."""
    if batch_size > available:
        raise ValueError(f"batch_size {batch_size} exceeds the {available} training images, and a batch draws "
                         f"distinct images; use a batch_size of at most {available} (--set batch_size=...).")


def images_to_tensor(images: np.ndarray) -> Tensor:
    """uint8 (N, H, W) → float (N, 1, H, W) in [-1, 1]."""
    return torch.from_numpy(images.astype(np.float32)).unsqueeze(1).div_(127.5).sub_(1.0)


class ImageBatches:
    """Training batches as a pure function of the step: ``batch(step, rank, world_size)`` → (images (b, 1, H, W)
    float, labels (b,) int64), b = batch_size / world_size, drawn without replacement within the step from
    ``np.random.default_rng((seed, step))``; with ``flip``, each image is mirrored horizontally with probability ½.
    Rank ``r`` takes the contiguous share ``r`` of the global batch (:func:`effml.data.batches.rank_share`, as the LM
    batches do), so the ranks' batches concatenated in rank order are the one-process batch."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int, flip: bool = False) -> None:
        _check_batch_size(batch_size, len(images))
        self.images, self.labels, self.batch_size, self.seed, self.flip = images, labels, batch_size, seed, flip

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> tuple[Tensor, Tensor]:
        rng = np.random.default_rng((self.seed, step))
        chosen = rank_share(rng.choice(len(self.images), self.batch_size, replace=False), rank, world_size)
        images = self.images[chosen]
        if self.flip:
            mirror = rank_share(rng.random(self.batch_size), rank, world_size) < 0.5
            images = np.where(mirror[:, None, None], images[:, :, ::-1], images)
        return images_to_tensor(images), torch.from_numpy(self.labels[chosen])


def eval_image_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, rank: int = 0, world_size: int = 1):
    """Consecutive (images, labels) batches over a whole split, in order; this rank's share of them
    (``effml.data.batches.rank_batch_ranges``)."""
    for indices in rank_batch_ranges(len(images), batch_size, rank, world_size):
        chosen = slice(indices.start, indices.stop)
        yield images_to_tensor(images[chosen]), torch.from_numpy(labels[chosen])


class ImageFolderSplit:
    """``root/<class>/<file>`` images (ImageNet layout), decoded with Pillow, resized (shorter side ``resize``) and
    centre-cropped to ``size``; ``batch(indices)`` → (float (b, 3, size, size) normalised per channel,
    labels (b,) int64).

    Only files whose extension is in ``IMAGE_EXTENSIONS`` (any case) are images; other files and every name starting
    with "." (``.ipynb_checkpoints``, ``.DS_Store``) are skipped. The label of an image is the index of its folder in
    ``classes``: by default this split's own sorted class folders; an evaluation split passes the training split's
    ``classes`` so that it numbers them alike (it may lack some of them, but a folder that is not among them is
    refused). Every class folder present must hold at least one image.
    """

    _MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    _STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

    def __init__(self, root: str | os.PathLike[str], size: int = 224, resize: int = 256,
                 classes: Sequence[str] | None = None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataUnavailableError(f"No image folder at {root}. The ImageNet preset needs the ILSVRC-2012 images "
                                       "laid out as <data_dir>/train/<class>/*.JPEG and <data_dir>/val/<class>/*.JPEG; "
                                       "set the recipe's data_dir to that directory.")
        try:
            from PIL import Image  # noqa: F401
        except ImportError as error:
            raise DataUnavailableError("Reading image folders needs Pillow: pip install pillow.") from error
        folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        self.classes = folders if classes is None else list(classes)
        labels = {name: label for label, name in enumerate(self.classes)}
        if len(labels) != len(self.classes):
            raise ValueError(f"ImageFolderSplit({root}): classes {self.classes} name a class twice.")
        unknown = [name for name in folders if name not in labels]
        if unknown:
            raise ValueError(f"{root} has class folders {unknown} that the training split does not have, so their "
                             "images have no label the model was trained on. Give the evaluation split only classes "
                             "of the training split (remove or move those folders, or add them to train/).")
        if not folders:
            raise DataUnavailableError(f"{root} has no <class>/<image> files (no class folders).")
        self.files: list[tuple[Path, int]] = []
        for name in folders:
            images = sorted(path for path in (root / name).iterdir() if not path.name.startswith(".")
                            and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file())
            if not images:
                raise ValueError(f"Class folder {root / name} holds no image (files ending in "
                                 f"{', '.join(IMAGE_EXTENSIONS)}); add its images or remove the folder.")
            self.files += [(path, labels[name]) for path in images]
        self.size, self.resize = size, resize

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, path: Path) -> Tensor:
        from PIL import Image

        with Image.open(path) as image:
            image = image.convert("RGB")
            scale = self.resize / min(image.size)
            width, height = (max(self.size, round(side * scale)) for side in image.size)
            image = image.resize((width, height))
            left, top = (image.width - self.size) // 2, (image.height - self.size) // 2
            image = image.crop((left, top, left + self.size, top + self.size))
            pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (pixels - self._MEAN) / self._STD

    def batch(self, indices: np.ndarray) -> tuple[Tensor, Tensor]:
        images = torch.stack([self._load(self.files[i][0]) for i in indices])
        return images, torch.tensor([self.files[i][1] for i in indices], dtype=torch.int64)


class ImageFolderBatches:
    """Training batches of an ``ImageFolderSplit`` as a pure function of the step (like ``ImageBatches``):
    ``batch(step, rank, world_size)`` → (float (b, 3, size, size), labels (b,) int64), b = batch_size / world_size,
    rank ``r``'s contiguous share of the global batch; a rank loads only its own images."""

    def __init__(self, split: ImageFolderSplit, batch_size: int, seed: int) -> None:
        _check_batch_size(batch_size, len(split))
        self.split, self.batch_size, self.seed = split, batch_size, seed

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> tuple[Tensor, Tensor]:
        rng = np.random.default_rng((self.seed, step))
        chosen = rng.choice(len(self.split), self.batch_size, replace=False)
        return self.split.batch(rank_share(chosen, rank, world_size))


_DIGITS_FIX = ("The 8×8 digits ship with scikit-learn (no download); install it with `pip install 'effml[images]'` "
               "(or `pip install scikit-learn`).")


def load_digits(size: int = 16, valid_size: int = 200, test_size: int = 360, seed: int = 0) -> ImageSplits:
    """scikit-learn's 1,797 handwritten 8×8 digits (values 0–16, 10 classes) as uint8 (N, size, size) images.

    Images are upsampled bilinearly (``align_corners=False``) to ``size`` × ``size`` when ``size`` is not 8 (it must
    be a positive multiple of 8), then scaled to 0–255 (value / 16 · 255, rounded). A permutation drawn from
    ``np.random.default_rng(seed)`` orders the images: the first ``test_size`` are the test split, the next
    ``valid_size`` the validation split, the rest the training split; labels are int64 (N,). Raises
    ``DataUnavailableError`` naming the fix when scikit-learn is not installed, and ValueError for a bad size.
    """
    if size <= 0 or size % 8:
        raise ValueError(f"size {size} must be a positive multiple of 8 (8, 16, 24, ...), so that each 8×8 digit "
                         "pixel maps onto a whole number of output pixels.")
    for name, value in (("valid_size", valid_size), ("test_size", test_size)):
        if value < 0:
            raise ValueError(f"{name} {value} must be at least 0.")
    try:
        from sklearn.datasets import load_digits as load_sklearn_digits
    except ImportError as error:
        raise DataUnavailableError(f"load_digits needs scikit-learn, which is not installed ({error}). "
                                   f"{_DIGITS_FIX}") from error
    digits = load_sklearn_digits()
    count = len(digits.images)
    if test_size + valid_size >= count:
        raise ValueError(f"test_size + valid_size = {test_size} + {valid_size} = {test_size + valid_size} must be in "
                         f"[0, {count - 1}], leaving at least one of the {count} digits for training.")
    pixels = torch.from_numpy(digits.images).unsqueeze(1)
    if size != 8:
        pixels = torch.nn.functional.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
    images = np.clip(np.rint(pixels.squeeze(1).numpy() * (255 / 16)), 0, 255).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(count)
    test, valid, train = np.split(order, [test_size, test_size + valid_size])
    return ImageSplits(images[train], labels[train], images[valid], labels[valid], images[test], labels[test],
                       len(digits.target_names))
