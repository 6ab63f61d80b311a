"""Where the work runs: the device of a model/guide pair, data placed there, pass sizes.

:func:`~pyro_ladder.fit` and :func:`~pyro_ladder.evaluate` take ``device=None``: the pair's
own device (that of the first parameter of the modules behind ``model`` and ``guide``,
e.g. ``vae.model``), else the data's. A device given explicitly moves those modules there.
Inside the model, the guides and the estimators every tensor is made on the device and
dtype of the data or of a parameter (``x.new_zeros``, ``torch.zeros_like``), never on
torch's defaults; ``tests/test_device.py`` checks it without a GPU.
"""

from __future__ import annotations

import torch

from ._util import modules_of
from .errors import ConfigError, DataError

CPU_MAX_ROWS = 2**12
"""(sample, data point) pairs per evaluation pass on a CPU: a pass's activations stay in
cache-sized blocks (measured fastest on the paper's network, ``benchmarks/``)."""

GPU_MAX_ROWS = 2**16
"""The same on a GPU: a pass must be large to fill the device (the paper network's widest
activation is then 128 MiB in float32). Not yet tuned on a GPU: ``benchmarks/gpu_check.sh``
measures throughput at several sizes."""

FIT_FRACTION = 0.25
"""The training set moves to a GPU only if it takes at most this share of the free memory
(MNIST in float32 takes 188 MB); larger sets stay on the host and each batch moves."""


def pair_device(model, guide, data: torch.Tensor | None = None) -> torch.device:
    """The device of the first parameter of the modules behind ``model`` and ``guide``
    (bound methods of ``nn.Module``); without one, that of ``data``; else the CPU."""
    for module in modules_of(model, guide):
        for param in module.parameters():
            return param.device
    return data.device if data is not None else torch.device("cpu")


def resolve(device, model, guide, data: torch.Tensor | None = None) -> torch.device:
    """``device`` (a ``torch.device`` or a string such as ``"cuda:0"``) with the pair's
    modules moved there, or the pair's own device for ``None``.

    :raises ConfigError: for an unknown device name or a CUDA device on a machine without.
    """
    if device is None:
        return pair_device(model, guide, data)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(
            f"unknown device {device!r} ({error}): use 'cpu', 'cuda' or 'cuda:N'"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r} asked for, but torch sees no CUDA device here")
    for module in modules_of(model, guide):
        module.to(device)
    return device


def check_dtype(model, guide, data: torch.Tensor) -> None:
    """Refuse floating data whose dtype differs from the pair's parameters (torch's own
    error would come later, from deep inside a matrix product)."""
    params = [p for m in modules_of(model, guide) for p in m.parameters()]
    if params and data.is_floating_point() and data.dtype != params[0].dtype:
        raise DataError(
            f"the data are {data.dtype} but the model's parameters are {params[0].dtype}: "
            f"convert one of them, e.g. data.to({params[0].dtype}) or model.to({data.dtype})"
        )


def place_rows(data: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``data`` on ``device`` when it fits there (see :data:`FIT_FRACTION`), else as it is:
    the caller then moves each batch (:func:`to_device`)."""
    if data.device == device:
        return data
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if data.numel() * data.element_size() > FIT_FRACTION * free:
            return data.pin_memory() if data.device.type == "cpu" else data
    return data.to(device)


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch on ``device`` (a no-op when it is there already); the copy from pinned host
    memory does not wait for the device."""
    return batch.to(device, non_blocking=True)


def default_max_rows(device: torch.device) -> int:
    """:func:`~pyro_ladder.evaluate`'s pass size for ``device``."""
    return CPU_MAX_ROWS if device.type == "cpu" else GPU_MAX_ROWS
