"""Image data: the IDX reader (all types, gzipped or not, and its errors), directories of IDX files, the
Fashion-MNIST and digits loaders and standardisation (the batches are tested in tests/data/test_image_batches.py)."""

from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from moekit.errors import MoekitError
from moekit.lab.data.images import (
    FASHION_MNIST_DIR,
    digits_split_indices,
    load_digits_split,
    load_fashion_mnist,
    load_idx_directory,
    load_images,
    read_idx,
)

_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, _CODES[array.dtype.type], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    raw = _idx_bytes(array)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def _fixture_dir(root: Path, n_train: int = 12, n_test: int = 5, size: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """The four MNIST-layout files (images gzipped, labels plain, as a mix) with random bytes and labels 0..2."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 3, n_train).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 3, n_test).astype(np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, a in arrays.items():
        gz = "images" in name
        _write_idx(root / (name + (".gz" if gz else "")), a, gz=gz)
    return arrays


# --- IDX --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(_CODES))
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trips_every_type(tmp_path, dtype, gz):
    rng = np.random.default_rng(1)
    a = (rng.standard_normal((3, 2, 5)) * 100).astype(dtype)
    got = read_idx(_write_idx(tmp_path / "x.idx", a, gz=gz))
    assert got.dtype == np.dtype(dtype) and got.shape == (3, 2, 5)
    np.testing.assert_array_equal(got, a)
    # big-endian on disk: the first int16 of [258] is bytes 01 02
    if dtype is np.int16:
        assert _idx_bytes(np.array([258], dtype=np.int16))[-2:] == b"\x01\x02"


def test_read_idx_reads_a_hand_written_label_file(tmp_path):
    # magic 00 00 08 01, one dim of 3, then the bytes 7 0 9
    path = tmp_path / "labels"
    path.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x03\x07\x00\x09")
    np.testing.assert_array_equal(read_idx(path), np.array([7, 0, 9], dtype=np.uint8))


def test_read_idx_errors_name_the_file(tmp_path):
    raw = _idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    cases = {
        "cut.idx": (raw[:-5], r"cut.idx is truncated: dims \(2, 3, 4\) need 24 data bytes, found 19"),
        "cut.idx.gz": (gzip.compress(raw[:-5]), "cut.idx.gz is truncated"),
        "header.idx": (raw[:9], "header.idx is truncated: 9 bytes, its header of 3 dims needs 16"),
        "tiny.idx": (raw[:2], "tiny.idx is truncated"),
        "magic.idx": (b"\x08\x03" + raw[2:], "magic.idx is not an IDX file: the magic starts 0803"),
        "type.idx": (raw[:2] + b"\x07" + raw[3:], "type.idx has an unknown type byte 0x07"),
        "long.idx": (raw + b"\x00", "long.idx: dims .* need 24 data bytes, but it holds 25"),
        "badgz.idx.gz": (gzip.compress(raw)[:-8], "badgz.idx.gz is a corrupted or truncated gzip file"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(MoekitError, match=message):
            read_idx(tmp_path / name)
    with pytest.raises(MoekitError, match="cannot read IDX file .*absent"):
        read_idx(tmp_path / "absent")


# --- loaders ----------------------------------------------------------------------------------------------------


def test_load_images_on_a_directory_of_idx_files(tmp_path):
    arrays = _fixture_dir(tmp_path / "tiny")
    raw = load_images(str(tmp_path / "tiny"), normalize=False)
    assert raw.name == "tiny" and raw.num_classes == 3
    assert raw.train_images.shape == (12, 1, 4, 4) and raw.test_images.shape == (5, 1, 4, 4)
    assert raw.train_images.dtype == np.float32 and raw.train_labels.dtype == np.int64
    assert raw.in_channels == 1 and raw.image_size == 4
    np.testing.assert_allclose(raw.train_images[:, 0], arrays["train-images-idx3-ubyte"] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(raw.test_labels, arrays["t10k-labels-idx1-ubyte"])
    assert raw.mean == (0.0,) and raw.std == (1.0,)

    std = load_images(str(tmp_path / "tiny"))
    m, s = raw.train_images.mean(dtype=np.float64), raw.train_images.std(dtype=np.float64)
    assert std.mean == pytest.approx((m,)) and std.std == pytest.approx((s,))
    assert float(std.train_images.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(std.train_images.std()) == pytest.approx(1.0, abs=1e-5)
    # the test split is standardised with the TRAIN statistics
    np.testing.assert_allclose(std.test_images, (raw.test_images - m) / s, rtol=1e-5, atol=1e-6)


def test_idx_directory_errors(tmp_path):
    _fixture_dir(tmp_path / "d")
    (tmp_path / "d" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(MoekitError, match="lacks the IDX file.*t10k-labels-idx1-ubyte"):
        load_idx_directory(tmp_path / "d")
    arrays = _fixture_dir(tmp_path / "e")
    _write_idx(tmp_path / "e" / "t10k-labels-idx1-ubyte", arrays["t10k-labels-idx1-ubyte"][:-1])
    with pytest.raises(MoekitError, match=r"test labels must be one per image \(5\)"):
        load_idx_directory(tmp_path / "e")
    with pytest.raises(MoekitError, match="does not exist"):
        load_images(str(tmp_path / "nowhere"))


def test_fashion_mnist_missing_names_the_directory_and_the_apt_command(tmp_path, monkeypatch):
    monkeypatch.delenv("MOEKIT_FASHION_MNIST", raising=False)
    with pytest.raises(MoekitError, match=r"not found in .*empty.*apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "empty")
    monkeypatch.setenv("MOEKIT_FASHION_MNIST", str(tmp_path / "elsewhere"))
    with pytest.raises(MoekitError, match="elsewhere.*apt-get install dataset-fashion-mnist"):
        load_images("fashion-mnist")


def test_fashion_mnist_reads_the_directory_from_the_environment(tmp_path, monkeypatch):
    _fixture_dir(tmp_path / "fm")
    monkeypatch.setenv("MOEKIT_FASHION_MNIST", str(tmp_path / "fm"))
    for name in ("fashion_mnist", "fashion-mnist", "Fashion-MNIST"):
        s = load_images(name)
        assert s.name == "fashion_mnist" and s.num_classes == 10  # the data set's 10 classes, not max label + 1
        assert len(s.train_labels) == 12 and len(s.test_labels) == 5


@pytest.mark.skipif(
    not Path(FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz").exists(), reason="dataset-fashion-mnist not installed"
)
def test_real_fashion_mnist_split(monkeypatch):
    monkeypatch.delenv("MOEKIT_FASHION_MNIST", raising=False)
    s = load_fashion_mnist(normalize=False)
    assert s.train_images.shape == (60000, 1, 28, 28) and s.test_images.shape == (10000, 1, 28, 28)
    assert np.bincount(s.train_labels).tolist() == [6000] * 10
    assert np.bincount(s.test_labels).tolist() == [1000] * 10
    assert float(s.train_images.min()) == 0.0 and float(s.train_images.max()) == 1.0
    # the known mean pixel of the training set, 72.94 / 255
    assert float(s.train_images.mean()) == pytest.approx(0.2860, abs=1e-4)


def test_unknown_dataset_suggests_the_closest_name():
    with pytest.raises(MoekitError, match=r"unknown image data set 'fashon_mnist' \(did you mean 'fashion_mnist'\?\)"):
        load_images("fashon_mnist")
    with pytest.raises(MoekitError, match="choose one of fashion_mnist, digits"):
        load_images("cifar")


def test_digits_split_is_fixed_disjoint_and_scaled():
    a = load_digits_split(normalize=False)
    b = load_digits_split(normalize=False)
    np.testing.assert_array_equal(a.train_images, b.train_images)
    np.testing.assert_array_equal(a.test_labels, b.test_labels)
    assert a.train_images.shape == (1497, 1, 8, 8) and a.test_images.shape == (300, 1, 8, 8)
    assert a.name == "digits" and a.num_classes == 10
    assert float(a.train_images.min()) == 0.0 and float(a.train_images.max()) == 1.0  # pixels 0..16 / 16
    train_idx, test_idx = digits_split_indices()
    assert len(np.intersect1d(train_idx, test_idx)) == 0
    assert sorted(np.concatenate([train_idx, test_idx]).tolist()) == list(range(1797))
    assert test_idx[:5].tolist() == digits_split_indices()[1][:5].tolist()
    from sklearn.datasets import load_digits

    bunch = load_digits()
    np.testing.assert_array_equal(a.test_images[:, 0] * 16, bunch.images[test_idx])
    np.testing.assert_array_equal(a.train_labels, bunch.target[train_idx])
    assert set(np.bincount(a.test_labels).tolist()) <= set(range(20, 41))  # every class in test
    # standardised by default, with the train statistics
    s = load_images("digits")
    assert s.mean[0] == pytest.approx(float(a.train_images.mean(dtype=np.float64)))
    assert float(s.train_images.std()) == pytest.approx(1.0, abs=1e-5)


def test_digits_without_scikit_learn_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import raise ImportError
    with pytest.raises(MoekitError, match=r"pip install scikit-learn.*moekit\[vision\]"):
        load_digits_split()
