"""Conditions ``c`` upstream of the latents: class labels as one-hot vectors, packed data.

A conditional model scores ``x`` given ``c``. Seed 004 treats the pair as one datum
``x' = (x, c)``; so does the library: :func:`pack` puts ``c`` beside ``x`` in one
``(N, x_dim + C)`` tensor, which :func:`~pyro_ladder.fit`, :func:`~pyro_ladder.evaluate`,
every diagnostic and the multi-process trainer batch, shuffle and shard like any data,
and :func:`unpack` splits it again inside a model or guide.
"""

from __future__ import annotations

import functools

import torch

from ._capture import defer_check
from .errors import DataError


def one_hot(labels, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Integer class labels ``(...)`` -> one-hot vectors ``(..., num_classes)`` of ``dtype``.

    :raises DataError: when a label is not an integer in ``[0, num_classes)``.
    """
    tensor = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(labels)
    # a tensor keeps its device (as_tensor would too, except under torch.set_default_device)
    _check_labels(labels, tensor, num_classes)
    return _one_hot(tensor, num_classes, dtype)


def _check_labels(raw, labels: torch.Tensor, num_classes: int) -> None:
    """Refuse labels that are not integers in range: ``raw`` as given, ``labels`` it as a
    tensor. A tensor's range is checked on each call's own labels in a captured step
    (compile=True), eagerly; Python values are checked as Python values (a captured step
    keys on them)."""
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
        raise DataError(
            f"class labels must be integers, got a {labels.dtype} tensor: pass integer labels "
            f"in [0, {num_classes}), or a (N, {num_classes}) float condition"
        )
    if isinstance(raw, torch.Tensor):
        defer_check(functools.partial(_check_label_range, num_classes=num_classes), raw)
        return
    values = raw if isinstance(raw, (list, tuple)) else [raw]
    while any(isinstance(v, (list, tuple)) for v in values):
        values = [w for v in values for w in (v if isinstance(v, (list, tuple)) else [v])]
    bad = [v for v in values if not 0 <= int(v) < num_classes][:5]
    if bad:
        raise DataError(
            f"class labels must lie in [0, {num_classes}) for {num_classes} classes, got {bad}: "
            f"build the model with condition_dim equal to the number of classes"
        )


def _one_hot(labels: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    # by comparison: torch's one_hot reads the labels' range on the host
    classes = torch.arange(num_classes, device=labels.device)
    return (labels.long().unsqueeze(-1) == classes).to(dtype)  # (..., num_classes)


def _check_label_range(labels: torch.Tensor, num_classes: int) -> None:
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)].flatten()[:5].tolist()
        raise DataError(
            f"class labels must lie in [0, {num_classes}) for {num_classes} classes, got {bad}: "
            f"build the model with condition_dim equal to the number of classes"
        )


def as_condition(c, num_rows: int, condition_dim: int, like: torch.Tensor) -> torch.Tensor:
    """``c`` as a ``(num_rows, condition_dim)`` float tensor on ``like``'s device and dtype.

    ``c`` may be one integer label (repeated), integer labels ``(num_rows,)`` (one-hot) or a
    float condition ``(num_rows, condition_dim)``.

    :raises DataError: when ``c`` has another shape, an out-of-range label or NaN.
    """
    raw, c = c, torch.as_tensor(c, device=like.device)
    if not c.is_floating_point():  # one-hot rows: finite by construction
        _check_labels(raw, c, condition_dim)
        c = _one_hot(c.expand(num_rows) if c.dim() == 0 else c, condition_dim, like.dtype)
    else:  # on each call's c in a captured step (a c cut from packed data: by the model)
        defer_check(_check_finite_condition, c, required=False)
    if tuple(c.shape) != (num_rows, condition_dim):
        raise DataError(
            f"a condition of shape {tuple(c.shape)} does not fit {num_rows} rows of a model "
            f"with condition_dim={condition_dim}: pass integer labels ({num_rows},) or a float "
            f"condition ({num_rows}, {condition_dim})"
        )
    return c.to(like.dtype)


def _check_finite_condition(c: torch.Tensor) -> None:
    if not torch.isfinite(c).all():
        raise DataError("the condition c holds NaN or infinite values")


def pack(x: torch.Tensor, c, num_classes: int | None = None) -> torch.Tensor:
    """``x (N, D)`` and ``c`` -> ``x' = (x, c)``: ``(N, D + C)``.

    :param c: integer labels ``(N,)`` (made one-hot with ``num_classes`` classes) or a
        float condition ``(N, C)``.
    :param num_classes: ``C`` for integer labels; ignored for a float condition.
    """
    if x.dim() != 2:
        raise DataError(f"pack takes x of shape (N, D), got {tuple(x.shape)}")
    c = torch.as_tensor(c, device=x.device)
    if not c.is_floating_point():
        if num_classes is None:
            raise DataError("pack needs num_classes to make integer labels one-hot")
        c = one_hot(c, num_classes, x.dtype)
    if c.dim() != 2 or c.shape[0] != x.shape[0]:
        raise DataError(
            f"x has {x.shape[0]} rows but the condition has shape {tuple(c.shape)}: pass one "
            "label or one condition vector per row"
        )
    return torch.cat([x, c.to(x.dtype)], -1)


def unpack(inputs: torch.Tensor, x_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x' (..., x_dim + C)`` -> ``(x (..., x_dim), c (..., C))``, both views of ``inputs``."""
    return inputs[..., :x_dim], inputs[..., x_dim:]
