"""Data sets for Ladder VAEs: loading, checking and binarizing image data.

Every loader returns a :class:`Dataset` whose splits are float32 matrices of shape
``(N, D)``, one flattened image per row, with values in ``[0, 1]``. Files are looked for
in a data directory chosen by :func:`resolve_data_dir`: the ``data_dir`` argument (the
command line's ``--data-dir``), else the ``PYRO_LADDER_DATA`` environment variable, else
``~/.cache/pyro_ladder``. Missing files are downloaded when ``download=True``; every
download is written to a temporary file in the destination folder and renamed into place
only once complete, so an interrupted download never leaves a half-written file.

Known data sets (:data:`DATASETS`):

* ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, no download), grey.
* ``binarized-mnist``: the static binarization of Larochelle & Murray (2011), binary,
  50,000 / 10,000 / 10,000 train / valid / test images, files
  ``binarized_mnist_{train,valid,test}.amat[.gz]`` in ``DATA_DIR/binarized_mnist/``
  or ``DATA_DIR/``.
* ``mnist`` and ``fashion-mnist``: the four IDX files (``train-images-idx3-ubyte``,
  ``t10k-...``, each gzipped or not) in torchvision's layout ``DATA_DIR/MNIST/raw/`` and
  ``DATA_DIR/FashionMNIST/raw/`` (``.gz`` copies are decompressed there; downloaded
  through torchvision when missing), or flat in ``DATA_DIR/`` or ``DATA_DIR/<name>/``
  as the operating system's package lays them out (``apt-get install
  dataset-fashion-mnist``: ``/usr/share/datasets/fashion-mnist/``), read in place; grey.
* ``frey-faces``: ``frey_rawface.mat`` in ``DATA_DIR/frey_faces/`` or ``DATA_DIR/``,
  1,965 continuous 28x20 images, a fixed 90 % / 10 % train / test split.
"""

from __future__ import annotations

import functools
import gzip
import http.client
import logging
import os
import pathlib
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pyro_ladder.errors import DataError
from pyro_ladder.likelihoods import is_binary

logger = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = ("digits", "binarized-mnist", "mnist", "fashion-mnist", "frey-faces")
"""Names accepted by :func:`load_dataset`."""

DATA_ENV = "PYRO_LADDER_DATA"
"""Environment variable naming the data directory when no ``data_dir`` is given."""

DEFAULT_DATA_DIR = pathlib.Path("~") / ".cache" / "pyro_ladder"
"""Data directory used when neither ``data_dir`` nor ``$PYRO_LADDER_DATA`` is set."""

BINARIZED_MNIST_URL = (
    "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
    "binarized_mnist_{split}.amat"
)
FREY_FACES_URL = "https://cs.nyu.edu/~roweis/data/frey_rawface.mat"
FREY_FACES_FILE = "frey_rawface.mat"

_DOWNLOAD_TIMEOUT_S = 60.0
_CHUNK_BYTES = 1 << 20
_FIX_DIR = f"or pass --data-dir / set {DATA_ENV} to a folder that holds it"
_BINARIZED_MNIST_PIXELS = 784
_FREY_SHAPE = (28, 20)
_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
# Bytes that str.split() treats as whitespace, so the fast and the slow .amat parsers agree.
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[[9, 10, 11, 12, 13, 32]] = True


@dataclass(frozen=True)
class Dataset:
    """An image data set split into train / test (and sometimes valid) matrices.

    :param name: one of :data:`DATASETS`.
    :param train: float32 tensor of shape ``(N_train, D)``, one flattened image a row.
    :param test: float32 tensor of shape ``(N_test, D)``.
    :param train_labels: int64 tensor of shape ``(N_train,)``, or ``None`` without labels.
    :param test_labels: int64 tensor of shape ``(N_test,)``, or ``None``.
    :param image_shape: ``(H, W)`` with ``H * W == D``.
    :param kind: ``"binary"`` (values in {0, 1}), ``"grey"`` (values in [0, 1], to be
        binarized for a Bernoulli likelihood) or ``"continuous"`` (values in [0, 1], for a
        Gaussian likelihood).
    :param valid: float32 tensor of shape ``(N_valid, D)`` where the publisher has a
        validation split (binarized MNIST), else ``None``.
    :param valid_labels: int64 tensor of shape ``(N_valid,)``, or ``None``.
    """

    name: str
    train: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor | None
    test_labels: torch.Tensor | None
    image_shape: tuple[int, int]
    kind: str
    valid: torch.Tensor | None = None
    valid_labels: torch.Tensor | None = None

    @property
    def x_dim(self) -> int:
        """:returns: ``D``, the number of pixels of one flattened image."""
        return int(self.train.shape[1])


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Choose the data directory (without checking that it exists).

    :param data_dir: the folder given as an option (``--data-dir``); ``None`` or ``""``
        falls back to ``$PYRO_LADDER_DATA``, then to ``~/.cache/pyro_ladder``.
    :returns: the folder, with ``~`` expanded.
    """
    return _resolve_data_dir(data_dir)[0]


def _resolve_data_dir(data_dir: str | os.PathLike | None) -> tuple[pathlib.Path, bool]:
    """:returns: the data directory and whether it is the default one."""
    if data_dir is not None and os.fspath(data_dir) != "":
        return pathlib.Path(data_dir).expanduser(), False
    from_env = os.environ.get(DATA_ENV, "")
    if from_env:
        return pathlib.Path(from_env).expanduser(), False
    return DEFAULT_DATA_DIR.expanduser(), True


def _check_data_dir(root: pathlib.Path, create: bool) -> None:
    """Fail early, with the fix, when the data directory is missing or unreadable.

    :param root: the data directory.
    :param create: create it when missing (only for the default cache directory, which
        a first download has to create).
    """
    if not root.exists():
        if not create:
            raise DataError(
                f"data directory {root} does not exist; create it, "
                f"or pass --data-dir / set {DATA_ENV} to an existing folder"
            )
        _make_dir(root)
    if not root.is_dir():
        raise DataError(
            f"data directory {root} is not a directory; "
            f"pass --data-dir / set {DATA_ENV} to a folder"
        )
    if not os.access(root, os.R_OK | os.X_OK):
        raise DataError(
            f"data directory {root} cannot be read (permission denied); fix its "
            f"permissions, or pass --data-dir / set {DATA_ENV} to a readable folder"
        )


def load_dataset(
    name: str, data_dir: str | os.PathLike | None = None, download: bool = True
) -> Dataset:
    """Load a data set by name, downloading missing files when allowed.

    :param name: one of :data:`DATASETS` (case-insensitive).
    :param data_dir: the data directory, see :func:`resolve_data_dir`; unused by
        ``digits``.
    :param download: fetch missing files from the publisher; with ``False`` a missing
        file is a :class:`~pyro_ladder.errors.DataError` naming where it is expected.
    :returns: the data set, every split checked (non-empty, finite, in [0, 1]).
    :raises DataError: unknown name, missing / malformed files, failed download.
    """
    key = name.strip().lower() if isinstance(name, str) else None
    if key not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of: {', '.join(DATASETS)}")
    start = time.perf_counter()
    if key == "digits":
        dataset = _load_digits()
    else:
        root, is_default = _resolve_data_dir(data_dir)
        _check_data_dir(root, create=is_default and download)
        dataset = _LOADERS[key](root, download)
    logger.info(
        "loaded %s: %d train / %d test images of %dx%d (%s) in %.2f s",
        dataset.name,
        dataset.train.shape[0],
        dataset.test.shape[0],
        *dataset.image_shape,
        dataset.kind,
        time.perf_counter() - start,
    )
    return dataset


def binarize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Stochastic binarization: one Bernoulli draw per value, with the value as probability.

    :param x: tensor of any shape, values in [0, 1].
    :param generator: random generator for reproducible draws (same device as ``x``).
    :returns: tensor of the same shape, device and floating dtype (float32 for integer
        ``x``), values in {0, 1}.
    :raises DataError: when ``x`` holds values outside [0, 1] or NaN.
    """
    probs = x if x.is_floating_point() else x.to(torch.float32)
    # The negated test also catches NaN, which torch.bernoulli would reject less clearly.
    if probs.numel() and not bool(((probs >= 0) & (probs <= 1)).all()):
        raise DataError(
            "binarize expects probabilities in [0, 1] (got values outside, or NaN); "
            "scale the data to [0, 1] first"
        )
    return torch.bernoulli(probs, generator=generator)


# --------------------------------------------------------------------------- .amat files


def read_amat(path: str | os.PathLike, n_values: int | None = None) -> torch.Tensor:
    """Read an ``.amat`` text file (or its gzip ``.amat.gz``) of binary images.

    One image per line, values ``0`` / ``1`` separated by whitespace.

    :param path: the ``.amat`` or ``.amat.gz`` file.
    :param n_values: the number of values each line must hold (784 for binarized MNIST);
        ``None`` only requires all lines to hold as many values as the first.
    :returns: float32 tensor of shape ``(N, D)``, one image a row, values in {0, 1}.
    :raises DataError: unreadable or empty file, a line with the wrong number of values,
        a non-numeric token or a value other than 0 / 1 (the message gives the line).
    """
    path = pathlib.Path(path)
    start = time.perf_counter()
    data = _read_amat_bytes(path).rstrip()
    if not data:
        raise DataError(f"{path} is empty; re-download it or point to a complete copy")
    values = _parse_amat_fast(data, n_values)
    if values is None:
        # Unusual spelling ("1.0") or a defect: the line-by-line parser decides which.
        values = _parse_amat_lines(data, n_values, path)
    logger.debug("read %s: %d x %d in %.2f s", path, *values.shape, time.perf_counter() - start)
    return torch.from_numpy(values.astype(np.float32))


def _read_amat_bytes(path: pathlib.Path) -> bytes:
    """:returns: the file's bytes, gunzipped when it is gzip (by suffix or magic number)."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            return gzip.decompress(raw)
    except FileNotFoundError as exc:
        raise DataError(f"{path} does not exist; check the path or the data directory") from exc
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(
            f"{path} is not a valid gzip file (corrupted or truncated); re-download it"
        ) from exc
    except OSError as exc:
        raise DataError(
            f"cannot read {path} ({exc.strerror or exc}); check that it is a readable file"
        ) from exc
    if path.suffix == ".gz":
        raise DataError(f"{path} is named .gz but is not gzip; re-download it or rename it")
    return raw


def _parse_amat_fast(data: bytes, n_values: int | None) -> np.ndarray | None:
    """Vectorized parser for the publisher's layout: single-character 0/1 tokens.

    :param data: the file's text, without trailing whitespace.
    :param n_values: required values per line, or ``None``.
    :returns: uint8 array of shape ``(N, D)``, or ``None`` when the text is not in that
        layout or holds a defect (the line-by-line parser then reports it).
    """
    buf = np.frombuffer(data, dtype=np.uint8)
    is_value = (buf == ord("0")) | (buf == ord("1"))
    if not (is_value | _WHITESPACE[buf]).all():
        return None
    # Two adjacent digits make a multi-character token such as "10".
    if (is_value[1:] & is_value[:-1]).any():
        return None
    line_starts = np.concatenate(([0], np.flatnonzero(buf == ord("\n")) + 1))
    # uint32 accumulation is several times faster than a bool -> int64 cast here.
    counts = np.add.reduceat(is_value.view(np.uint8), line_starts, dtype=np.uint32)
    width = counts[0] if n_values is None else n_values
    if width == 0 or (counts != width).any():
        return None
    return (buf[is_value] - ord("0")).reshape(len(counts), int(width))


def _parse_amat_lines(data: bytes, n_values: int | None, path: pathlib.Path) -> np.ndarray:
    """Line-by-line parser, slower, for unusual spellings and precise error messages.

    :param data: the file's text, without trailing whitespace.
    :param n_values: required values per line, or ``None``.
    :param path: the file, for messages.
    :returns: uint8 array of shape ``(N, D)``.
    """
    rows = []
    width = n_values
    for line_no, line in enumerate(data.decode("utf-8", errors="replace").split("\n"), 1):
        tokens = line.split()
        width = len(tokens) if width is None else width
        if not tokens or len(tokens) != width:
            found = "no values" if not tokens else f"{len(tokens)} values"
            raise DataError(
                f"{path}, line {line_no}: {found}, expected {width or 'at least one'}; "
                "the file is truncated or corrupted, re-download it"
            )
        rows.append(_parse_amat_row(tokens, line_no, path))
    return np.stack(rows)


def _parse_amat_row(tokens: list[str], line_no: int, path: pathlib.Path) -> np.ndarray:
    """:returns: one line's tokens as a uint8 array; raises DataError on a bad token."""
    try:
        row = np.array(tokens, dtype=np.float64)
    except ValueError:
        bad = next(token for token in tokens if not _is_number(token))
        raise DataError(
            f"{path}, line {line_no}: non-numeric token {bad[:20]!r}; "
            "expected 0 or 1, re-download the file"
        ) from None
    is_binary = (row == 0) | (row == 1)
    if not is_binary.all():
        bad_value = row[~is_binary][0]
        raise DataError(
            f"{path}, line {line_no}: value {bad_value:g} is not 0 or 1; "
            "this file is not binarized, re-download it"
        )
    return row.astype(np.uint8)


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------- files, downloads


def _first_existing(candidates: list[pathlib.Path]) -> pathlib.Path | None:
    """:returns: the first candidate that is a file, or ``None``."""
    return next((path for path in candidates if path.is_file()), None)


def _make_dir(folder: pathlib.Path) -> bool:
    """Create ``folder`` (and its parents) if missing.

    :returns: whether it was created here, so a failed download can remove it again.
    """
    if folder.is_dir():
        return False
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"cannot create folder {folder} ({exc.strerror or exc}); create it yourself, "
            f"or pass --data-dir / set {DATA_ENV} to a writable folder"
        ) from exc
    return True


def _download(url: str, dest: pathlib.Path) -> None:
    """Download ``url`` to ``dest`` through a temporary file in the same folder.

    :param url: the publisher's address.
    :param dest: the final file; it appears only once the download is complete.
    :raises DataError: on any network or write failure, naming the URL, the folder and the
        fix; nothing is left on disk then.
    """
    created = _make_dir(dest.parent)
    try:
        tmp = tempfile.NamedTemporaryFile(
            dir=dest.parent, prefix=f".{dest.name}.", suffix=".part", delete=False
        )
    except OSError as exc:
        _remove_empty_dir(dest.parent, created)
        raise DataError(
            f"cannot write to {dest.parent} ({exc.strerror or exc}); fix its permissions, "
            f"or pass --data-dir / set {DATA_ENV} to a writable folder"
        ) from exc
    logger.info("downloading %s to %s", url, dest)
    try:
        with tmp, urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
            shutil.copyfileobj(response, tmp, _CHUNK_BYTES)
        os.replace(tmp.name, dest)
    except BaseException as exc:
        # Also on KeyboardInterrupt: a partial download must not stay behind.
        pathlib.Path(tmp.name).unlink(missing_ok=True)
        _remove_empty_dir(dest.parent, created)
        if not isinstance(exc, (OSError, http.client.HTTPException, ValueError)):
            raise
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(
            f"could not download {url} ({reason}); download it into {dest.parent} "
            f"yourself, {_FIX_DIR}"
        ) from exc


def _remove_empty_dir(folder: pathlib.Path, created: bool) -> None:
    """Remove ``folder`` if this module created it and it is still empty."""
    if created:
        try:
            folder.rmdir()
        except OSError:
            logger.debug("left folder %s in place (not empty)", folder)


def _check_split(dataset: str, split: str, x: torch.Tensor, source: object, kind: str) -> None:
    """Check a loaded split of shape ``(N, D)``: non-empty, finite, in [0, 1] (or {0, 1}).

    :param dataset: data set name, for messages.
    :param split: ``"train"``, ``"valid"`` or ``"test"``.
    :param x: the split.
    :param source: the file (or description) it came from, for messages.
    :param kind: ``"binary"`` requires values exactly 0 or 1.
    """
    where = f"{dataset} {split} split (from {source})"
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise DataError(f"{where} is empty (shape {tuple(x.shape)}); use a complete copy")
    if not bool(torch.isfinite(x).all()):
        raise DataError(f"{where} holds NaN or infinite values; re-download or fix the file")
    if kind == "binary":
        if not is_binary(x):
            raise DataError(f"{where} holds values other than 0 and 1; re-download the file")
    elif not bool(((x >= 0) & (x <= 1)).all()):
        raise DataError(f"{where} holds values outside [0, 1]; re-download or fix the file")


# --------------------------------------------------------------------------- loaders


def _load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits, split 80 / 20 stratified with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    # A fixed seed makes the split identical on every machine; stratifying keeps the
    # ten classes balanced in the small test set.
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.2, stratify=labels, random_state=0
    )
    source = "scikit-learn's bundled digits"
    train = torch.as_tensor(x_train / 16.0, dtype=torch.float32)
    test = torch.as_tensor(x_test / 16.0, dtype=torch.float32)
    _check_split("digits", "train", train, source, "grey")
    _check_split("digits", "test", test, source, "grey")
    return Dataset(
        name="digits",
        train=train,
        test=test,
        train_labels=torch.as_tensor(y_train, dtype=torch.int64),
        test_labels=torch.as_tensor(y_test, dtype=torch.int64),
        image_shape=(8, 8),
        kind="grey",
    )


def _load_binarized_mnist(root: pathlib.Path, download: bool) -> Dataset:
    """Larochelle & Murray's statically binarized MNIST (50,000 / 10,000 / 10,000)."""
    splits = {
        split: _binarized_mnist_split(root, split, download) for split in ("train", "valid", "test")
    }
    return Dataset(
        name="binarized-mnist",
        train=splits["train"],
        test=splits["test"],
        train_labels=None,
        test_labels=None,
        image_shape=(28, 28),
        kind="binary",
        valid=splits["valid"],
    )


def _binarized_mnist_split(root: pathlib.Path, split: str, download: bool) -> torch.Tensor:
    """:returns: one split of binarized MNIST, shape ``(N, 784)``, found or downloaded."""
    base = f"binarized_mnist_{split}.amat"
    folder = root / "binarized_mnist"
    path = _first_existing([folder / base, folder / f"{base}.gz", root / base, root / f"{base}.gz"])
    if path is None:
        url = BINARIZED_MNIST_URL.format(split=split)
        if not download:
            raise DataError(
                f"binarized MNIST file {base} (or {base}.gz) not found in {folder} or "
                f"{root}; download {url} into {folder}, {_FIX_DIR}"
            )
        path = folder / base
        _download(url, path)
    x = read_amat(path, n_values=_BINARIZED_MNIST_PIXELS)
    _check_split("binarized-mnist", split, x, path, "binary")
    return x


def _load_mnist_like(name: str, root: pathlib.Path, download: bool) -> Dataset:
    """MNIST or Fashion-MNIST through torchvision, pixel values scaled to [0, 1]."""
    from torchvision import datasets

    cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
    raw = root / cls.__name__ / "raw"
    flat = None if _has_idx_files(raw) else _flat_idx_folder(root, name)
    if flat is not None:
        splits = [_flat_idx_split(name, split, flat) for split in ("train", "test")]
        return _mnist_like_dataset(name, splits)
    _decompress_idx_archives(raw)
    missing = [file for file in _IDX_FILES if not (raw / file).is_file()]
    if missing and not download:
        raise DataError(
            f"{name}: {', '.join(missing)} (or .gz) not found in {raw}, nor all four IDX "
            f"files flat in {root} or {root / name}; put the IDX files in one of these "
            f"folders, allow downloads, {_FIX_DIR}"
        )
    train_set, test_set = _torchvision_splits(cls, root, raw, download=bool(missing))
    splits = [
        _idx_split(name, split, ds, raw) for split, ds in (("train", train_set), ("test", test_set))
    ]
    return _mnist_like_dataset(name, splits)


def _mnist_like_dataset(name: str, splits: list) -> Dataset:
    """:returns: the data set of ``[(train, train_labels), (test, test_labels)]``."""
    return Dataset(
        name=name,
        train=splits[0][0],
        test=splits[1][0],
        train_labels=splits[0][1],
        test_labels=splits[1][1],
        image_shape=(28, 28),
        kind="grey",
    )


def _idx_path(folder: pathlib.Path, file: str) -> pathlib.Path | None:
    """``folder / file``, else ``folder / (file + ".gz")``, else None."""
    return _first_existing([folder / file, folder / f"{file}.gz"])


def _has_idx_files(folder: pathlib.Path) -> bool:
    return all(_idx_path(folder, file) is not None for file in _IDX_FILES)


def _flat_idx_folder(root: pathlib.Path, name: str) -> pathlib.Path | None:
    """The first of ``root`` and ``root / name`` holding all four IDX files (or .gz), or
    None: the flat layout of the operating system's packages."""
    return next((f for f in (root, root / name) if _has_idx_files(f)), None)


def _flat_idx_split(name: str, split: str, folder: pathlib.Path):
    """:returns: ``(x, labels)`` of shapes ``(N, 784)`` float32 and ``(N,)`` int64, read in
    place (the folder may be read-only) from the IDX files of ``split``."""
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_idx_path(folder, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_idx_path(folder, f"{prefix}-labels-idx1-ubyte"))
    if images.shape[1:] != (28, 28) or labels.shape != (images.shape[0],):
        raise DataError(
            f"{name} {split} IDX files in {folder} hold images of shape {images.shape} and "
            f"labels of shape {labels.shape}; expected (N, 28, 28) and (N,), re-download them"
        )
    x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0)
    _check_split(name, split, x, folder, "grey")
    return x, torch.from_numpy(labels.astype(np.int64))


# IDX type codes (http://yann.lecun.com/exdb/mnist/): big-endian numpy dtypes
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (MNIST's format), gzipped or not (by suffix or magic number).

    Layout: two zero bytes, a type code, the number of dimensions ``n``, ``n`` big-endian
    uint32 sizes, then the values in C order.

    :returns: the array, of the file's shape and type (``uint8`` for MNIST).
    :raises DataError: a file that is not IDX, or whose size disagrees with its header.
    """
    path = pathlib.Path(path)
    data = _read_amat_bytes(path)  # gunzips by magic number, DataError on bad gzip
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number); re-download it")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data[4:header], dtype=">u4"))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(shape) != ndim or len(data) != expected:
        raise DataError(
            f"{path} is truncated or malformed: its header announces shape {shape} "
            f"({expected} bytes) but the file holds {len(data)} bytes; re-download it"
        )
    return (
        np.frombuffer(data, dtype=dtype, offset=header)
        .reshape(shape)
        .astype(dtype.newbyteorder("="))
    )


def _decompress_idx_archives(raw: pathlib.Path) -> None:
    """Decompress ``X.gz`` next to a missing ``X``, as torchvision reads only ``X``.

    torchvision would do this itself only when allowed to download and only for copies
    with the publisher's MD5; doing it here also serves ``download=False`` and repacked
    copies (such as Debian's Fashion-MNIST).
    """
    for file in _IDX_FILES:
        target, archive = raw / file, raw / f"{file}.gz"
        if target.is_file() or not archive.is_file():
            continue
        try:
            _gunzip(archive, target)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(
                f"cannot decompress {archive} ({' '.join(str(exc).split())}); re-download "
                f"it, or put the uncompressed {file} in {raw}"
            ) from exc


def _gunzip(archive: pathlib.Path, target: pathlib.Path) -> None:
    """Decompress ``archive`` to ``target`` through a temporary file in the same folder."""
    tmp = tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", delete=False)
    try:
        with tmp, gzip.open(archive, "rb") as source:
            shutil.copyfileobj(source, tmp, _CHUNK_BYTES)
        os.replace(tmp.name, target)
    except BaseException:
        pathlib.Path(tmp.name).unlink(missing_ok=True)
        raise


def _torchvision_splits(cls: type, root: pathlib.Path, raw: pathlib.Path, download: bool):
    """:returns: torchvision's train and test data sets; DataError on any failure.

    A failed download removes the files it added, so nothing half-written remains.
    """
    before = set(raw.iterdir()) if raw.is_dir() else None
    try:
        train_set = cls(str(root), train=True, download=download)
        test_set = cls(str(root), train=False, download=False)
    except (RuntimeError, OSError, ValueError, TypeError, AssertionError, IndexError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        if not download:
            raise DataError(
                f"cannot read the IDX files in {raw} ({reason}); they are malformed, "
                "re-download them"
            ) from exc
        _remove_new_files(raw, before)
        raise DataError(
            f"could not download {cls.__name__} into {raw} ({reason}); put the IDX files "
            f"there yourself, {_FIX_DIR}"
        ) from exc
    return train_set, test_set


def _remove_new_files(raw: pathlib.Path, before: set[pathlib.Path] | None) -> None:
    """Remove what a failed download added to ``raw`` (the folders too if it made them)."""
    if not raw.is_dir():
        return
    for path in set(raw.iterdir()) - (before or set()):
        if path.is_file():
            path.unlink(missing_ok=True)
    if before is None:
        _remove_empty_dir(raw, created=True)
        _remove_empty_dir(raw.parent, created=True)


def _idx_split(name: str, split: str, ds, raw: pathlib.Path):
    """:returns: ``(x, labels)`` of shapes ``(N, 784)`` float32 and ``(N,)`` int64."""
    images, labels = ds.data, ds.targets
    if tuple(images.shape[1:]) != (28, 28) or labels.shape != (images.shape[0],):
        raise DataError(
            f"{name} {split} IDX files in {raw} hold images of shape {tuple(images.shape)} "
            f"and labels of shape {tuple(labels.shape)}; expected (N, 28, 28) and (N,), "
            "re-download them"
        )
    x = images.reshape(images.shape[0], -1).to(torch.float32) / 255.0
    _check_split(name, split, x, raw, "grey")
    return x, labels.to(torch.int64)


def _load_frey_faces(root: pathlib.Path, download: bool) -> Dataset:
    """Frey faces: 28x20 video frames, a fixed random 90 / 10 train / test split."""
    folder = root / "frey_faces"
    path = _first_existing([folder / FREY_FACES_FILE, root / FREY_FACES_FILE])
    if path is None:
        if not download:
            raise DataError(
                f"{FREY_FACES_FILE} not found in {folder} or {root}; download "
                f"{FREY_FACES_URL} into {folder}, {_FIX_DIR}"
            )
        path = folder / FREY_FACES_FILE
        _download(FREY_FACES_URL, path)
    images = _read_frey_mat(path)
    # Consecutive frames of a video are near-duplicates, so a contiguous hold-out would
    # differ from the training frames; a fixed permutation mixes them the same way
    # everywhere.
    order = torch.from_numpy(np.random.default_rng(0).permutation(images.shape[0]))
    n_test = (images.shape[0] + 5) // 10  # 10 %, rounded half up
    test, train = images[order[:n_test]], images[order[n_test:]]
    for split, x in (("train", train), ("test", test)):
        _check_split("frey-faces", split, x, path, "continuous")
    return Dataset(
        name="frey-faces",
        train=train,
        test=test,
        train_labels=None,
        test_labels=None,
        image_shape=_FREY_SHAPE,
        kind="continuous",
    )


def _read_frey_mat(path: pathlib.Path) -> torch.Tensor:
    """:returns: the images of ``frey_rawface.mat`` as float32 ``(N, 560)`` in [0, 1]."""
    import scipy.io

    try:
        contents = scipy.io.loadmat(str(path))
    except (
        scipy.io.matlab.MatReadError,
        OSError,
        ValueError,
        TypeError,
        EOFError,
        NotImplementedError,
        zlib.error,
    ) as exc:
        raise DataError(
            f"cannot read {path} as a MATLAB file ({' '.join(str(exc).split())}); re-download it"
        ) from exc
    pixels = _FREY_SHAPE[0] * _FREY_SHAPE[1]
    ff = contents.get("ff")
    if ff is None:
        raise DataError(f"{path} has no variable 'ff' (the Frey faces); re-download it")
    if not isinstance(ff, np.ndarray) or ff.ndim != 2 or ff.shape[0] != pixels:
        shape = getattr(ff, "shape", None)
        raise DataError(
            f"{path}: 'ff' has shape {shape}, expected ({pixels}, N) with one 28x20 image "
            "per column; re-download it"
        )
    if ff.dtype.kind not in "uif":
        raise DataError(f"{path}: 'ff' has dtype {ff.dtype}, expected uint8; re-download it")
    # One image per column in the file; rows here, flattened row-major as (28, 20).
    return torch.from_numpy(np.ascontiguousarray(ff.T, dtype=np.float32) / 255.0)


# Loaders that read files from the data directory ("digits" needs none).
_LOADERS: dict[str, Callable[[pathlib.Path, bool], Dataset]] = {
    "binarized-mnist": _load_binarized_mnist,
    "mnist": functools.partial(_load_mnist_like, "mnist"),
    "fashion-mnist": functools.partial(_load_mnist_like, "fashion-mnist"),
    "frey-faces": _load_frey_faces,
}
