"""Image classification data sets for the ViT: an IDX reader (the MNIST / Fashion-MNIST file format), the real
Fashion-MNIST split from the Debian package, and scikit-learn's bundled 8x8 digits with a fixed split. The batches
the trainer draws from a split are in :mod:`moekit.data.images` (``ImageBatches``, ``ImageEvalData``).

Everything works offline: Fashion-MNIST comes from ``apt-get install dataset-fashion-mnist`` (or any directory of
IDX files), the digits from the scikit-learn wheel.

Shape legend: N examples, C channels, H height, W width.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moekit.config import suggest
from moekit.errors import MoekitError

__all__ = [
    "ImageSplits",
    "read_idx",
    "load_fashion_mnist",
    "load_digits_split",
    "digits_split_indices",
    "load_idx_directory",
    "load_images",
    "FASHION_MNIST_DIR",
    "IMAGE_DATASETS",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_DATASETS = ("fashion_mnist", "digits")
DIGITS_TEST_SIZE = 300
DIGITS_SPLIT_SEED = 0

# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_SPLIT_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzipped or not: detected by the gzip magic 0x1f8b) into an array of its dims, in the
    native byte order. Raises :class:`MoekitError` naming the file when it is missing, truncated, has a bad magic
    or an unknown type byte, or holds more data than its dims say."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise MoekitError(f"cannot read IDX file {path}: {exc.strerror or exc}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise MoekitError(f"IDX file {path} is a corrupted or truncated gzip file: {exc}") from None
    if len(raw) < 4:
        raise MoekitError(f"IDX file {path} is truncated: {len(raw)} bytes, shorter than the 4-byte magic")
    if raw[0] != 0 or raw[1] != 0:
        raise MoekitError(
            f"{path} is not an IDX file: the magic starts {raw[:2].hex()}, expected 0000 (then type and ndim bytes)"
        )
    dtype = _IDX_DTYPES.get(raw[2])
    if dtype is None:
        raise MoekitError(
            f"IDX file {path} has an unknown type byte 0x{raw[2]:02x}; known: "
            + ", ".join(f"0x{k:02x}" for k in _IDX_DTYPES)
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise MoekitError(f"IDX file {path} is truncated: {len(raw)} bytes, its header of {ndim} dims needs {header}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(raw) - header
    if got < expected:
        raise MoekitError(f"IDX file {path} is truncated: dims {dims} need {expected} data bytes, found {got}")
    if got > expected:
        raise MoekitError(f"IDX file {path}: dims {dims} need {expected} data bytes, but it holds {got}")
    data = np.frombuffer(raw, dtype=dtype, count=expected // dtype.itemsize, offset=header)
    return data.reshape(dims).astype(dtype.newbyteorder("="))


@dataclass
class ImageSplits:
    """A train / test split of a classification data set, ready for the ViT.

    Attributes:
        train_images: float32 ``[N, C, H, W]`` numpy array: pixels scaled to [0, 1] (divided by the format's
            maximum: 255 for IDX bytes, 16 for the digits), then standardised with the train split's per-channel
            ``mean`` and ``std`` (see below).
        train_labels: int64 ``[N]``.
        test_images: as ``train_images``, standardised with the same (train) statistics.
        test_labels: int64 ``[N_test]``.
        num_classes: number of classes (labels are ``0 .. num_classes - 1``).
        name: the data set's name ("fashion_mnist", "digits", or the directory's name).
        mean: per-channel mean of the [0, 1]-scaled train pixels that was subtracted (0.0 when not standardised).
        std: per-channel standard deviation that was divided by (1.0 when not standardised).
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    name: str
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    @property
    def in_channels(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def image_size(self) -> int:
        """Height of the images (the ViT needs square ones: ``image_size`` is also their width)."""
        return int(self.train_images.shape[2])


def _make_splits(
    name: str,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    pixel_max: float,
    normalize: bool,
    num_classes: int | None = None,
    where: str = "",
) -> ImageSplits:
    where = where or name
    for split, images, labels in (("train", train_images, train_labels), ("test", test_images, test_labels)):
        if images.ndim not in (3, 4):
            raise MoekitError(f"{where}: {split} images must be [N, H, W] or [N, C, H, W], got {images.shape}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise MoekitError(
                f"{where}: {split} labels must be one per image ({len(images)}), got shape {labels.shape}"
            )
        if len(images) == 0:
            raise MoekitError(f"{where}: the {split} split is empty")
        if labels.min() < 0:
            raise MoekitError(f"{where}: {split} labels must be >= 0, got {int(labels.min())}")
    n_classes = int(max(train_labels.max(), test_labels.max())) + 1 if num_classes is None else num_classes
    if int(max(train_labels.max(), test_labels.max())) >= n_classes:
        raise MoekitError(f"{where}: labels must be below num_classes={n_classes}")

    def scaled(images: np.ndarray) -> np.ndarray:
        x = images.astype(np.float32) / np.float32(pixel_max)
        return x[:, None] if x.ndim == 3 else x

    train_x, test_x = scaled(train_images), scaled(test_images)
    if train_x.shape[1:] != test_x.shape[1:]:
        raise MoekitError(f"{where}: train images {train_x.shape[1:]} and test images {test_x.shape[1:]} differ")
    channels = train_x.shape[1]
    mean, std = (0.0,) * channels, (1.0,) * channels
    if normalize:
        # Standardise with the TRAIN statistics only (the test split must not leak into preprocessing): zero-mean,
        # unit-variance pixels suit the LeCun-scaled patch projection and make one learning rate fit both data sets
        # (Fashion-MNIST's mean pixel is ~0.29, the digits' ~0.30 but with most pixels exactly 0).
        m = train_x.mean(axis=(0, 2, 3), dtype=np.float64)
        s = train_x.std(axis=(0, 2, 3), dtype=np.float64)
        s = np.where(s > 0, s, 1.0)
        shift = m.astype(np.float32)[None, :, None, None]
        div = s.astype(np.float32)[None, :, None, None]
        train_x = (train_x - shift) / div
        test_x = (test_x - shift) / div
        mean, std = tuple(float(v) for v in m), tuple(float(v) for v in s)
    return ImageSplits(
        train_images=np.ascontiguousarray(train_x, dtype=np.float32),
        train_labels=train_labels.astype(np.int64),
        test_images=np.ascontiguousarray(test_x, dtype=np.float32),
        test_labels=test_labels.astype(np.int64),
        num_classes=n_classes,
        name=name,
        mean=mean,
        std=std,
    )


def _find_idx(directory: Path, stem: str) -> Path | None:
    # The Fashion-MNIST / MNIST downloads name files "train-images-idx3-ubyte(.gz)"; some mirrors use a dot.
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def load_idx_directory(
    directory: str | os.PathLike, *, name: str | None = None, num_classes: int | None = None, normalize: bool = True
) -> ImageSplits:
    """The split held by a directory of the four MNIST-layout IDX files (``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally
    ``.gz``). Pixels are bytes (maximum 255); ``num_classes`` defaults to the largest label + 1."""
    d = Path(directory)
    if not d.is_dir():
        raise MoekitError(f"image directory {d} does not exist")
    paths = {key: _find_idx(d, stem) for key, stem in _SPLIT_FILES.items()}
    missing = [_SPLIT_FILES[k] for k, p in paths.items() if p is None]
    if missing:
        raise MoekitError(f"{d} lacks the IDX file(s) {', '.join(missing)} (optionally .gz)")
    arrays = {key: read_idx(p) for key, p in paths.items()}
    return _make_splits(
        name or d.name,
        arrays["train_images"],
        arrays["train_labels"],
        arrays["test_images"],
        arrays["test_labels"],
        pixel_max=255.0,
        normalize=normalize,
        num_classes=num_classes,
        where=str(d),
    )


def load_fashion_mnist(root: str | os.PathLike | None = None, *, normalize: bool = True) -> ImageSplits:
    """Fashion-MNIST (Xiao et al. 2017): the official 60,000 train / 10,000 test split of 28x28 grey images in 10
    classes. ``root`` defaults to ``$MOEKIT_FASHION_MNIST`` or ``/usr/share/datasets/fashion-mnist`` (Debian
    package ``dataset-fashion-mnist``)."""
    if root is None:
        root = os.environ.get("MOEKIT_FASHION_MNIST") or FASHION_MNIST_DIR
    d = Path(root)
    if not d.is_dir() or any(_find_idx(d, stem) is None for stem in _SPLIT_FILES.values()):
        raise MoekitError(
            f"Fashion-MNIST not found in {d}: install it with `apt-get install dataset-fashion-mnist`"
            f" (files in {FASHION_MNIST_DIR}), or set MOEKIT_FASHION_MNIST to a directory holding"
            f" {', '.join(_SPLIT_FILES.values())} (optionally .gz)"
        )
    return load_idx_directory(d, name="fashion_mnist", num_classes=10, normalize=normalize)


def load_digits_split(*, normalize: bool = True) -> ImageSplits:
    """scikit-learn's bundled digits (1,797 8x8 images, pixel values 0..16, 10 classes) with a FIXED split: a
    permutation drawn from ``np.random.default_rng(0)`` puts the first 300 images in test and the other 1,497 in
    train (not stratified; every class still gets 20..40 test images). The same on every call and machine."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise MoekitError(
            "the digits data set needs scikit-learn: `pip install scikit-learn` (or the moekit[vision] extra)"
        ) from None
    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32)  # [1797, 8, 8]
    labels = np.asarray(bunch.target, dtype=np.int64)
    train_idx, test_idx = digits_split_indices(len(images))
    return _make_splits(
        "digits",
        images[train_idx],
        labels[train_idx],
        images[test_idx],
        labels[test_idx],
        pixel_max=16.0,
        normalize=normalize,
        num_classes=10,
    )


def digits_split_indices(n: int = 1797) -> tuple[np.ndarray, np.ndarray]:
    """``(train_idx, test_idx)``, sorted, into the ``n`` images of ``sklearn.datasets.load_digits()``: the fixed
    split of :func:`load_digits_split`."""
    perm = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(n)
    return np.sort(perm[DIGITS_TEST_SIZE:]), np.sort(perm[:DIGITS_TEST_SIZE])


def load_images(name_or_path: str, *, normalize: bool = True) -> ImageSplits:
    """``"fashion_mnist"`` (or ``"fashion-mnist"``), ``"digits"``, or a directory holding the four MNIST-layout IDX
    files (:func:`load_idx_directory`)."""
    key = str(name_or_path).strip()
    canonical = key.lower().replace("-", "_")
    if canonical == "fashion_mnist":
        return load_fashion_mnist(normalize=normalize)
    if canonical == "digits":
        return load_digits_split(normalize=normalize)
    if Path(key).expanduser().is_dir():
        return load_idx_directory(Path(key).expanduser(), normalize=normalize)
    if "/" in key or os.sep in key:
        raise MoekitError(f"image data directory {key} does not exist")
    raise MoekitError(
        f"unknown image data set {key!r}{suggest(canonical, IMAGE_DATASETS)}; choose one of"
        f" {', '.join(IMAGE_DATASETS)}, or a directory holding the four IDX files"
    )
