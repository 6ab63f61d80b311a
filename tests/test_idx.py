"""IDX files (MNIST's format) read in place from a flat folder, as the OS packages lay them out."""

import gzip
import pathlib
import struct

import numpy as np
import pytest
import torch

from pyro_ladder import DataError
from pyro_ladder.data import load_dataset, read_idx


def _idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    """Header written by hand from the format's definition: 0, 0, type code, ndim, sizes."""
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _arrays(n: int, seed: int):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    return images, rng.integers(0, 10, size=n, dtype=np.uint8)


def _write_flat(folder: pathlib.Path, seed: int = 0, gzipped=(True, False, True, False)):
    """The four files, some gzipped and some not; returns the arrays written."""
    folder.mkdir(parents=True, exist_ok=True)
    (train_x, train_y), (test_x, test_y) = _arrays(12, seed), _arrays(5, seed + 1)
    files = {
        "train-images-idx3-ubyte": train_x,
        "train-labels-idx1-ubyte": train_y,
        "t10k-images-idx3-ubyte": test_x,
        "t10k-labels-idx1-ubyte": test_y,
    }
    for (name, array), gz in zip(files.items(), gzipped, strict=True):
        payload = _idx_bytes(array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(payload))
        else:
            (folder / name).write_bytes(payload)
    return train_x, train_y, test_x, test_y


def _listing(root: pathlib.Path):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("gzipped", [(True,) * 4, (False,) * 4, (True, False, False, True)])
def test_flat_folder_is_read_in_place(tmp_path, gzipped):
    train_x, train_y, test_x, test_y = _write_flat(tmp_path, gzipped=gzipped)
    before = _listing(tmp_path)
    data = load_dataset("fashion-mnist", tmp_path, download=False)
    assert _listing(tmp_path) == before  # nothing written: the OS folder is read-only
    assert data.name == "fashion-mnist" and data.kind == "grey" and data.image_shape == (28, 28)
    assert data.train.shape == (12, 784) and data.test.shape == (5, 784)
    assert data.train.dtype == torch.float32 and data.test_labels.dtype == torch.int64
    assert torch.equal(data.train, torch.from_numpy(train_x.reshape(12, 784)).float() / 255)
    assert torch.equal(data.test[2], torch.from_numpy(test_x[2].ravel()).float() / 255)
    assert data.train_labels.tolist() == train_y.tolist()
    assert data.test_labels.tolist() == test_y.tolist()


def test_named_sub_folder_of_the_data_dir(tmp_path):
    """``--data-dir /usr/share/datasets`` finds ``/usr/share/datasets/fashion-mnist/``."""
    train_x, *_ = _write_flat(tmp_path / "mnist", seed=3)
    data = load_dataset("mnist", tmp_path, download=False)
    assert torch.equal(data.train[0], torch.from_numpy(train_x[0].ravel()).float() / 255)


def test_torchvision_layout_wins_when_complete(tmp_path):
    _write_flat(tmp_path, seed=0)
    train_x, *_ = _write_flat(tmp_path / "FashionMNIST" / "raw", seed=10, gzipped=(False,) * 4)
    data = load_dataset("fashion-mnist", tmp_path, download=False)
    assert torch.equal(data.train[0], torch.from_numpy(train_x[0].ravel()).float() / 255)


def test_neither_layout_is_a_clear_error(tmp_path):
    _write_flat(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()  # three of the four files
    before = _listing(tmp_path)
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", tmp_path, download=False)
    message = str(err.value)
    assert str(tmp_path / "FashionMNIST" / "raw") in message
    assert f"flat in {tmp_path} or {tmp_path / 'fashion-mnist'}" in message
    assert "t10k-labels-idx1-ubyte" in message and "\n" not in message
    assert _listing(tmp_path) == before


def test_read_idx_other_types_and_gzip(tmp_path):
    values = np.arange(-6, 6, dtype=np.int16).reshape(2, 3, 2)
    (tmp_path / "a.gz").write_bytes(gzip.compress(_idx_bytes(values, 0x0B)))
    out = read_idx(tmp_path / "a.gz")
    assert out.dtype == np.int16 and np.array_equal(out, values)
    floats = np.linspace(0, 1, 4).astype(np.float64)
    (tmp_path / "b").write_bytes(_idx_bytes(floats, 0x0E))
    assert np.array_equal(read_idx(tmp_path / "b"), floats)


def test_read_idx_refuses_bad_files(tmp_path):
    images, labels = _arrays(3, 0)
    (tmp_path / "short").write_bytes(_idx_bytes(images)[:-1])
    with pytest.raises(DataError, match=r"truncated or malformed.*\(3, 28, 28\)"):
        read_idx(tmp_path / "short")
    (tmp_path / "magic").write_bytes(b"\x01\x00" + _idx_bytes(labels)[2:])
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "magic")
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8bnot gzip")
    with pytest.raises(DataError, match="gzip"):
        read_idx(tmp_path / "bad.gz")


def test_flat_files_of_the_wrong_shape_are_refused(tmp_path):
    _write_flat(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(11, np.uint8)))
    with pytest.raises(DataError, match=r"labels of shape \(11,\)"):
        load_dataset("mnist", tmp_path, download=False)
