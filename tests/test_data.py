"""Tests for pyro_ladder.data: loaders, .amat parsing, downloads, checks, binarize."""

from __future__ import annotations

import gzip
import io
import os
import pathlib
import struct
import urllib.error
import urllib.request

import numpy as np
import pytest
import scipy.io
import torch

from pyro_ladder.data import (
    BINARIZED_MNIST_URL,
    DATA_ENV,
    DATASETS,
    FREY_FACES_URL,
    Dataset,
    binarize,
    load_dataset,
    read_amat,
    resolve_data_dir,
)
from pyro_ladder.errors import DataError

# The real data sets sit next to the checkout (../shared/data from the project's root).
SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    """Seed, ignore the caller's $PYRO_LADDER_DATA, and forbid real network access."""
    torch.manual_seed(0)
    np.random.seed(0)
    monkeypatch.delenv(DATA_ENV, raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)


def _files(folder: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _write_amat(path: pathlib.Path, rows: np.ndarray) -> None:
    text = "".join(" ".join(str(int(v)) for v in row) + "\n" for row in rows).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(text) if path.suffix == ".gz" else text)


def _write_idx(
    raw: pathlib.Path, prefix: str, images: np.ndarray, labels: np.ndarray, compress: bool = False
) -> None:
    """Write IDX files as published: big-endian header, then uint8 values."""
    raw.mkdir(parents=True, exist_ok=True)
    n = images.shape[0]
    contents = {
        f"{prefix}-images-idx3-ubyte": struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes(),
        f"{prefix}-labels-idx1-ubyte": struct.pack(">II", 0x801, n) + labels.tobytes(),
    }
    for name, payload in contents.items():
        if compress:
            (raw / f"{name}.gz").write_bytes(gzip.compress(payload))
        else:
            (raw / name).write_bytes(payload)


def _mnist_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    return images, labels


def _frey_ff(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(560, n), dtype=np.uint8)


def _sorted_rows(x: torch.Tensor) -> np.ndarray:
    return np.array(sorted(map(tuple, x.numpy().tolist())))


class _FakeResponse(io.BytesIO):
    """A urlopen() result serving ``payload``, optionally failing after ``fail_after``."""

    def __init__(self, payload: bytes, fail_after: int | None = None):
        super().__init__(payload)
        self.fail_after = fail_after

    def read(self, size: int = -1) -> bytes:
        if self.fail_after is not None and self.tell() >= self.fail_after:
            raise ConnectionResetError("connection reset by peer")
        return super().read(size if self.fail_after is None else min(size, self.fail_after))


# --------------------------------------------------------------------------- names, dirs


def test_dataset_names_and_unknown_name_lists_them():
    assert DATASETS == ("digits", "binarized-mnist", "mnist", "fashion-mnist", "frey-faces")
    with pytest.raises(DataError) as err:
        load_dataset("cifar10")
    message = str(err.value)
    assert "'cifar10'" in message
    for name in DATASETS:
        assert name in message


def test_resolve_data_dir_option_env_default(monkeypatch, tmp_path):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    assert resolve_data_dir() == home / ".cache" / "pyro_ladder"
    monkeypatch.setenv(DATA_ENV, "")
    assert resolve_data_dir() == home / ".cache" / "pyro_ladder"
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "from_env"))
    assert resolve_data_dir() == tmp_path / "from_env"
    assert resolve_data_dir(None) == tmp_path / "from_env"
    assert resolve_data_dir(tmp_path / "option") == tmp_path / "option"
    assert resolve_data_dir(str(tmp_path / "option")) == tmp_path / "option"
    assert resolve_data_dir("~/data") == home / "data"


def test_load_dataset_honours_env_variable(monkeypatch, tmp_path):
    scipy.io.savemat(tmp_path / "frey_rawface.mat", {"ff": _frey_ff(20)})
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    dataset = load_dataset("frey-faces", download=False)
    assert (dataset.train.shape, dataset.test.shape) == ((18, 560), (2, 560))


def test_missing_data_dir_is_reported(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="does not exist") as err:
        load_dataset("frey-faces", missing, download=True)
    assert str(missing) in str(err.value) and DATA_ENV in str(err.value)
    assert not missing.exists()


def test_data_dir_that_is_a_file_is_reported(tmp_path):
    not_dir = tmp_path / "file.txt"
    not_dir.write_text("x")
    with pytest.raises(DataError, match="is not a directory"):
        load_dataset("binarized-mnist", not_dir, download=False)


def test_unreadable_data_dir_is_reported(monkeypatch, tmp_path):
    # Permission bits do not stop root, so the check's verdict is simulated for this path.
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if pathlib.Path(path) == tmp_path:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    with pytest.raises(DataError, match="cannot be read") as err:
        load_dataset("mnist", tmp_path, download=False)
    assert str(tmp_path) in str(err.value)


def test_default_data_dir_is_created_for_a_download(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    payload = io.BytesIO()
    scipy.io.savemat(payload, {"ff": _frey_ff(10)})
    monkeypatch.setattr(
        urllib.request, "urlopen", lambda url, timeout=None: _FakeResponse(payload.getvalue())
    )
    dataset = load_dataset("frey-faces")
    assert (tmp_path / ".cache" / "pyro_ladder" / "frey_faces" / "frey_rawface.mat").is_file()
    assert dataset.train.shape == (9, 560)


def test_default_data_dir_is_not_created_without_download(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("frey-faces", download=False)
    assert _files(tmp_path) == []


# --------------------------------------------------------------------------- digits


def test_digits_shapes_kind_labels_values():
    dataset = load_dataset("digits")
    assert isinstance(dataset, Dataset)
    assert dataset.name == "digits" and dataset.kind == "grey"
    assert dataset.train.shape == (1437, 64) and dataset.test.shape == (360, 64)
    assert dataset.train.dtype == torch.float32 and dataset.x_dim == 64
    assert dataset.image_shape == (8, 8)
    assert dataset.train_labels.shape == (1437,) and dataset.test_labels.shape == (360,)
    assert dataset.train_labels.dtype == torch.int64
    assert dataset.valid is None and dataset.valid_labels is None
    for split in (dataset.train, dataset.test):
        assert split.min().item() == 0.0 and split.max().item() == 1.0
    # Values were 0..16, so every value is a multiple of 1/16.
    assert torch.equal(dataset.train * 16, torch.round(dataset.train * 16))


def test_digits_split_is_fixed_stratified_and_complete():
    from sklearn.datasets import load_digits

    first, second = load_dataset("digits"), load_dataset("digits")
    assert torch.equal(first.train, second.train) and torch.equal(first.test, second.test)
    # Pinned so that a change of split (seed, library behaviour) is noticed.
    assert first.test_labels[:12].tolist() == [7, 6, 3, 7, 7, 3, 2, 8, 9, 3, 2, 6]
    assert first.train_labels[:12].tolist() == [3, 9, 1, 3, 1, 9, 4, 4, 2, 8, 3, 5]
    counts = torch.bincount(first.test_labels, minlength=10)
    assert counts.min().item() >= 35 and counts.max().item() <= 37
    everything = torch.cat([first.train, first.test])
    reference = torch.as_tensor(load_digits().data / 16.0, dtype=torch.float32)
    np.testing.assert_array_equal(_sorted_rows(everything), _sorted_rows(reference))


def test_digits_needs_no_data_dir(tmp_path):
    dataset = load_dataset("Digits", tmp_path / "does-not-exist", download=False)
    assert dataset.name == "digits"


# --------------------------------------------------------------------------- .amat parsing


@pytest.mark.parametrize("suffix", [".amat", ".amat.gz"])
def test_read_amat_round_trips(tmp_path, suffix):
    rows = np.random.default_rng(1).integers(0, 2, size=(7, 13))
    path = tmp_path / f"small{suffix}"
    _write_amat(path, rows)
    x = read_amat(path)
    assert x.dtype == torch.float32 and x.shape == (7, 13)
    np.testing.assert_array_equal(x.numpy(), rows)
    assert torch.equal(read_amat(str(path), n_values=13), x)


def test_read_amat_accepts_tabs_crlf_trailing_blank_lines(tmp_path):
    path = tmp_path / "crlf.amat"
    path.write_bytes(b"0\t1 1\r\n 1 0  0\r\n\r\n\n")
    np.testing.assert_array_equal(read_amat(path).numpy(), [[0, 1, 1], [1, 0, 0]])


def test_read_amat_accepts_decimal_spelling(tmp_path):
    path = tmp_path / "decimal.amat"
    path.write_text("1.0 0.0 1\n0 0.00 1e0\n")
    np.testing.assert_array_equal(read_amat(path).numpy(), [[1, 0, 1], [0, 0, 1]])


MALFORMED = [
    ("0 1 0\n1 1\n0 0 1\n", 2, "2 values, expected 3"),
    ("0 1 0\n0 1 0 1\n", 2, "4 values, expected 3"),
    ("0 1 0\n0 1 0\n0 x 1\n", 3, "non-numeric token 'x'"),
    ("0 1 0\n0 2 0\n", 2, "value 2 is not 0 or 1"),
    ("0 1 0\n0 10 0\n", 2, "value 10 is not 0 or 1"),
    ("0 1 0\n0 1 nan\n", 2, "value nan is not 0 or 1"),
    ("0 1 0\n0 0.5 0\n", 2, "value 0.5 is not 0 or 1"),
    ("0 1 0\n\n0 1 0\n", 2, "no values"),
    ("\n0 1 0\n", 1, "no values"),
]


@pytest.mark.parametrize("suffix", [".amat", ".amat.gz"])
@pytest.mark.parametrize(("text", "line", "fragment"), MALFORMED)
def test_read_amat_rejects_malformed_lines(tmp_path, suffix, text, line, fragment):
    path = tmp_path / f"bad{suffix}"
    payload = text.encode()
    path.write_bytes(gzip.compress(payload) if suffix.endswith(".gz") else payload)
    with pytest.raises(DataError) as err:
        read_amat(path)
    message = str(err.value)
    assert f"line {line}:" in message and fragment in message
    assert str(path) in message and "\n" not in message


def test_read_amat_checks_required_width(tmp_path):
    path = tmp_path / "narrow.amat"
    path.write_text("0 1 0\n1 1 1\n")
    with pytest.raises(DataError, match=r"line 1: 3 values, expected 784"):
        read_amat(path, n_values=784)


@pytest.mark.parametrize("content", [b"", b"\n  \n\t\n", gzip.compress(b"")])
def test_read_amat_rejects_empty_file(tmp_path, content):
    path = tmp_path / "empty.amat"
    path.write_bytes(content)
    with pytest.raises(DataError, match="is empty") as err:
        read_amat(path)
    assert str(path) in str(err.value)


def test_read_amat_rejects_broken_gzip_and_missing_file(tmp_path):
    truncated = tmp_path / "truncated.amat.gz"
    truncated.write_bytes(gzip.compress(b"0 1 0\n" * 1000)[:40])
    with pytest.raises(DataError, match="not a valid gzip file"):
        read_amat(truncated)
    plain = tmp_path / "plain.amat.gz"
    plain.write_text("0 1\n")
    with pytest.raises(DataError, match="named .gz but is not gzip"):
        read_amat(plain)
    with pytest.raises(DataError, match="does not exist"):
        read_amat(tmp_path / "absent.amat")


# --------------------------------------------------------------------------- binarized MNIST


@pytest.mark.skipif(not (SHARED_DATA / "binarized_mnist").is_dir(), reason="no shared data")
def test_binarized_mnist_real_files():
    dataset = load_dataset("binarized-mnist", SHARED_DATA, download=False)
    assert dataset.kind == "binary" and dataset.image_shape == (28, 28) and dataset.x_dim == 784
    assert dataset.train.shape == (50000, 784)
    assert dataset.valid.shape == (10000, 784) and dataset.test.shape == (10000, 784)
    assert dataset.train_labels is None and dataset.test_labels is None
    assert dataset.valid_labels is None
    for split in (dataset.train, dataset.valid, dataset.test):
        assert split.dtype == torch.float32
        assert torch.equal(split, (split > 0.5).float())
        # About 13 % of binarized MNIST pixels are on.
        assert 0.12 < split.mean().item() < 0.14
    direct = read_amat(SHARED_DATA / "binarized_mnist" / "binarized_mnist_test.amat.gz", 784)
    assert torch.equal(direct, dataset.test)


def test_binarized_mnist_file_layouts_and_preference(tmp_path):
    rng = np.random.default_rng(2)
    train, valid, test, other = (rng.integers(0, 2, size=(n, 784)) for n in (5, 3, 4, 2))
    _write_amat(tmp_path / "binarized_mnist" / "binarized_mnist_train.amat.gz", train)
    _write_amat(tmp_path / "binarized_mnist_valid.amat", valid)
    _write_amat(tmp_path / "binarized_mnist" / "binarized_mnist_test.amat", test)
    _write_amat(tmp_path / "binarized_mnist_test.amat.gz", other)  # the sub-folder wins
    dataset = load_dataset("binarized-mnist", tmp_path, download=False)
    np.testing.assert_array_equal(dataset.train.numpy(), train)
    np.testing.assert_array_equal(dataset.valid.numpy(), valid)
    np.testing.assert_array_equal(dataset.test.numpy(), test)


def test_binarized_mnist_wrong_width_names_file_and_line(tmp_path):
    rows = np.zeros((3, 784), dtype=int)
    for split in ("train", "valid", "test"):
        _write_amat(tmp_path / f"binarized_mnist_{split}.amat", rows)
    bad = tmp_path / "binarized_mnist_valid.amat"
    bad.write_text(bad.read_text() + "0 1\n")
    with pytest.raises(DataError, match=r"line 4: 2 values, expected 784") as err:
        load_dataset("binarized-mnist", tmp_path, download=False)
    assert str(bad) in str(err.value)


def test_binarized_mnist_missing_without_download(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("binarized-mnist", tmp_path, download=False)
    message = str(err.value)
    assert str(tmp_path / "binarized_mnist") in message
    assert BINARIZED_MNIST_URL.format(split="train") in message
    assert "--data-dir" in message and DATA_ENV in message
    assert _files(tmp_path) == []


def test_binarized_mnist_download_failure_leaves_nothing(monkeypatch, tmp_path):
    def refuse(url, timeout=None):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    with pytest.raises(DataError) as err:
        load_dataset("binarized-mnist", tmp_path, download=True)
    message = str(err.value)
    assert BINARIZED_MNIST_URL.format(split="train") in message
    assert str(tmp_path / "binarized_mnist") in message and DATA_ENV in message
    assert "Name or service not known" in message and "\n" not in message
    assert _files(tmp_path) == []


def test_interrupted_download_leaves_nothing(monkeypatch, tmp_path):
    payload = b"0 1\n" * 100_000
    monkeypatch.setattr(
        urllib.request,
        "urlopen",
        lambda url, timeout=None: _FakeResponse(payload, fail_after=1000),
    )
    with pytest.raises(DataError, match="connection reset by peer"):
        load_dataset("binarized-mnist", tmp_path, download=True)
    assert _files(tmp_path) == []


def test_binarized_mnist_download_success(monkeypatch, tmp_path):
    rng = np.random.default_rng(3)
    served = {
        split: rng.integers(0, 2, size=(n, 784))
        for split, n in (("train", 6), ("valid", 2), ("test", 3))
    }
    calls = []

    def serve(url, timeout=None):
        calls.append((url, timeout))
        split = url.rsplit("_", 1)[1].removesuffix(".amat")
        text = "".join(" ".join(map(str, row)) + "\n" for row in served[split])
        return _FakeResponse(text.encode())

    monkeypatch.setattr(urllib.request, "urlopen", serve)
    dataset = load_dataset("binarized-mnist", tmp_path, download=True)
    assert [url for url, _ in calls] == [
        BINARIZED_MNIST_URL.format(split=s) for s in ("train", "valid", "test")
    ]
    assert all(timeout is not None and timeout > 0 for _, timeout in calls)
    assert _files(tmp_path) == ["binarized_mnist"] + [
        f"binarized_mnist/binarized_mnist_{s}.amat" for s in ("test", "train", "valid")
    ]
    np.testing.assert_array_equal(dataset.train.numpy(), served["train"])
    np.testing.assert_array_equal(dataset.valid.numpy(), served["valid"])
    np.testing.assert_array_equal(dataset.test.numpy(), served["test"])


# --------------------------------------------------------------------------- MNIST, Fashion


@pytest.mark.parametrize(
    ("name", "folder", "compress"),
    [("mnist", "MNIST", False), ("fashion-mnist", "FashionMNIST", True)],
)
def test_mnist_like_from_idx_files(capfd, tmp_path, name, folder, compress):
    raw = tmp_path / folder / "raw"
    train_images, train_labels = _mnist_arrays(20, seed=4)
    test_images, test_labels = _mnist_arrays(10, seed=5)
    _write_idx(raw, "train", train_images, train_labels, compress)
    _write_idx(raw, "t10k", test_images, test_labels, compress)
    dataset = load_dataset(name, tmp_path, download=True)
    assert dataset.name == name and dataset.kind == "grey" and dataset.image_shape == (28, 28)
    assert dataset.train.shape == (20, 784) and dataset.test.shape == (10, 784)
    assert dataset.train.dtype == torch.float32 and dataset.train_labels.dtype == torch.int64
    expected = torch.from_numpy(train_images.reshape(20, 784)).float() / 255.0
    assert torch.equal(dataset.train, expected)
    assert dataset.train_labels.tolist() == train_labels.tolist()
    assert dataset.test_labels.tolist() == test_labels.tolist()
    assert torch.equal(dataset.test[3], torch.from_numpy(test_images[3].ravel()).float() / 255)
    assert capfd.readouterr().out == ""
    if compress:
        assert not [f for f in _files(raw) if f.startswith(".")]
        assert (raw / "train-images-idx3-ubyte").is_file()


def test_mnist_missing_without_download(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("mnist", tmp_path, download=False)
    message = str(err.value)
    assert str(tmp_path / "MNIST" / "raw") in message and "train-images-idx3-ubyte" in message
    assert DATA_ENV in message
    assert _files(tmp_path) == []


def test_mnist_download_failure_leaves_nothing(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", tmp_path, download=True)
    message = str(err.value)
    assert "could not download FashionMNIST" in message
    assert str(tmp_path / "FashionMNIST" / "raw") in message and "\n" not in message
    assert _files(tmp_path) == []


def test_mnist_malformed_idx_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    images, labels = _mnist_arrays(6, seed=6)
    _write_idx(raw, "train", images, labels)
    _write_idx(raw, "t10k", images, labels)
    # A well-formed label file that holds one label fewer than there are images.
    short = struct.pack(">II", 0x801, 5) + labels[:5].tobytes()
    (raw / "t10k-labels-idx1-ubyte").write_bytes(short)
    with pytest.raises(DataError, match=r"expected \(N, 28, 28\) and \(N,\)") as err:
        load_dataset("mnist", tmp_path, download=False)
    assert str(raw) in str(err.value)
    (raw / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03garbage")
    with pytest.raises(DataError, match="cannot read the IDX files"):
        load_dataset("mnist", tmp_path, download=False)


def test_mnist_corrupted_gzip(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    images, labels = _mnist_arrays(4, seed=7)
    _write_idx(raw, "train", images, labels, compress=True)
    _write_idx(raw, "t10k", images, labels, compress=True)
    archive = raw / "t10k-images-idx3-ubyte.gz"
    archive.write_bytes(archive.read_bytes()[:30])
    with pytest.raises(DataError, match="cannot decompress") as err:
        load_dataset("mnist", tmp_path, download=False)
    assert str(archive) in str(err.value)
    assert not (raw / "t10k-images-idx3-ubyte").exists()
    assert not [f for f in _files(raw) if f.startswith(".")]


# --------------------------------------------------------------------------- Frey faces


@pytest.mark.parametrize("subfolder", ["frey_faces", ""])
def test_frey_faces_small_file(tmp_path, subfolder):
    ff = _frey_ff(30)
    (tmp_path / subfolder).mkdir(exist_ok=True)
    scipy.io.savemat(tmp_path / subfolder / "frey_rawface.mat", {"ff": ff})
    dataset = load_dataset("frey-faces", tmp_path, download=False)
    assert dataset.kind == "continuous" and dataset.image_shape == (28, 20)
    assert dataset.train.shape == (27, 560) and dataset.test.shape == (3, 560)
    assert dataset.train_labels is None and dataset.test_labels is None
    everything = torch.cat([dataset.train, dataset.test])
    reference = torch.from_numpy(ff.T.astype(np.float32) / 255.0)
    np.testing.assert_array_equal(_sorted_rows(everything), _sorted_rows(reference))
    # Fixed permutation: the held-out frames are the same on every run.
    order = np.random.default_rng(0).permutation(30)
    np.testing.assert_array_equal(dataset.test.numpy(), reference.numpy()[order[:3]])
    again = load_dataset("frey-faces", tmp_path, download=False)
    assert torch.equal(again.train, dataset.train)


@pytest.mark.skipif(not (SHARED_DATA / "frey_faces").is_dir(), reason="no shared data")
def test_frey_faces_real_file():
    dataset = load_dataset("frey-faces", SHARED_DATA, download=False)
    assert dataset.train.shape == (1768, 560) and dataset.test.shape == (197, 560)
    assert dataset.image_shape == (28, 20) and dataset.x_dim == 560
    everything = torch.cat([dataset.train, dataset.test])
    assert everything.min().item() >= 0.0 and everything.max().item() <= 1.0
    # Grey faces: the mean intensity is about 0.6, far from both ends.
    assert 0.55 < everything.mean().item() < 0.65
    assert torch.equal(everything * 255, torch.round(everything * 255))


@pytest.mark.parametrize(
    ("contents", "fragment"),
    [
        ({"faces": _frey_ff(10)}, "no variable 'ff'"),
        ({"ff": np.zeros((559, 10), dtype=np.uint8)}, "'ff' has shape (559, 10)"),
        ({"ff": np.zeros((560, 10), dtype=np.complex128)}, "dtype complex128"),
    ],
)
def test_frey_faces_malformed_mat(tmp_path, contents, fragment):
    path = tmp_path / "frey_rawface.mat"
    scipy.io.savemat(path, contents)
    with pytest.raises(DataError) as err:
        load_dataset("frey-faces", tmp_path, download=False)
    assert fragment in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("content", [b"", b"this is not a MATLAB file" * 10])
def test_frey_faces_unreadable_mat(tmp_path, content):
    (tmp_path / "frey_rawface.mat").write_bytes(content)
    with pytest.raises(DataError, match="cannot read .* as a MATLAB file"):
        load_dataset("frey-faces", tmp_path, download=False)


@pytest.mark.parametrize(
    ("bad_value", "fragment"), [(np.nan, "NaN or infinite"), (300.0, "outside [0, 1]")]
)
def test_bad_values_in_data_are_rejected(tmp_path, bad_value, fragment):
    ff = _frey_ff(20).astype(np.float64)
    ff[7, 4] = bad_value
    path = tmp_path / "frey_rawface.mat"
    scipy.io.savemat(path, {"ff": ff})
    with pytest.raises(DataError) as err:
        load_dataset("frey-faces", tmp_path, download=False)
    message = str(err.value)
    assert fragment in message and "frey-faces" in message and str(path) in message


def test_frey_faces_missing_and_download_failure(monkeypatch, tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("frey-faces", tmp_path, download=False)
    assert str(tmp_path / "frey_faces") in str(err.value) and FREY_FACES_URL in str(err.value)

    def refuse(url, timeout=None):
        raise urllib.error.HTTPError(url, 404, "Not Found", None, None)

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    with pytest.raises(DataError) as err:
        load_dataset("frey-faces", tmp_path, download=True)
    assert FREY_FACES_URL in str(err.value) and "404" in str(err.value)
    assert str(tmp_path / "frey_faces") in str(err.value)
    assert _files(tmp_path) == []


# --------------------------------------------------------------------------- binarize


def test_binarize_values_mean_and_shape():
    probs = torch.rand(300, 400)
    draws = binarize(probs)
    assert draws.shape == probs.shape and draws.dtype == torch.float32
    assert set(draws.unique().tolist()) == {0.0, 1.0}
    assert abs(draws.mean().item() - probs.mean().item()) < 0.01
    constant = binarize(torch.full((200, 500), 0.3))
    assert abs(constant.mean().item() - 0.3) < 0.01
    assert torch.equal(binarize(torch.zeros(3, 4)), torch.zeros(3, 4))
    assert torch.equal(binarize(torch.ones(3, 4, dtype=torch.float64)), torch.ones(3, 4))


def test_binarize_is_deterministic_with_a_seeded_generator():
    probs = torch.full((50, 60), 0.5)
    first = binarize(probs, generator=torch.Generator().manual_seed(7))
    second = binarize(probs, generator=torch.Generator().manual_seed(7))
    other = binarize(probs, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan")])
def test_binarize_rejects_non_probabilities(bad):
    probs = torch.full((4, 4), 0.5)
    probs[2, 3] = bad
    with pytest.raises(DataError, match=r"probabilities in \[0, 1\]"):
        binarize(probs)


def test_too_few_frey_frames_give_an_empty_split(tmp_path):
    scipy.io.savemat(tmp_path / "frey_rawface.mat", {"ff": _frey_ff(4)})
    with pytest.raises(DataError, match=r"frey-faces test split .* is empty \(shape \(0, 560\)\)"):
        load_dataset("frey-faces", tmp_path, download=False)


def test_binary_split_check_rejects_grey_values():
    # read_amat already refuses such values; this guards splits built any other way.
    from pyro_ladder.data import _check_split

    grey = torch.tensor([[0.0, 1.0, 0.5]])
    with pytest.raises(DataError, match="binarized-mnist test split .* other than 0 and 1"):
        _check_split("binarized-mnist", "test", grey, "x.amat", "binary")
    _check_split("frey-faces", "test", grey, "x.mat", "continuous")
