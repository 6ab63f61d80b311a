"""State shared by the code a captured step runs (:mod:`pyro_ladder.elbo.captured`).

While a step is being captured into a graph (``torch.fx``'s ``make_fx``, which records
every tensor operation and refuses to read a tensor's value), code that would read values
on the host asks :func:`capturing` and takes a path that does not:

* the data checks of the ladder (binary values, finite values) are deferred with
  :func:`defer_check`: the captured step runs them eagerly on each call's own tensors,
  outside the graph;
* the few value reads of the estimators (a fast path when a gradient's scale is 1, the
  check that all layers share one KL weight) take their general path, which computes the
  same numbers.
"""

from __future__ import annotations

import contextlib

_STATE = {"checks": None}  # the deferred checks of the capture in progress, or None


def capturing() -> bool:
    """Is a step being captured now (no host reads of tensor values allowed)?"""
    return _STATE["checks"] is not None


@contextlib.contextmanager
def capture_scope():
    """Mark a capture in progress; yields the list that collects :func:`defer_check`'s
    ``(fn, tensors, required)``."""
    if capturing():
        raise RuntimeError("a step is being captured already; captures do not nest")
    checks: list = []
    _STATE["checks"] = checks
    try:
        yield checks
    finally:
        _STATE["checks"] = None


def defer_check(fn, *tensors, required: bool = True) -> None:
    """Inside a capture, record ``fn(*tensors)`` to be run eagerly, outside the graph, on
    each later call's tensors in the place of these (``tensors`` must be arguments of the
    step; one that is not refuses the capture when ``required``, else the check is
    dropped); outside a capture, run it now."""
    if not capturing():
        fn(*tensors)
        return
    _STATE["checks"].append((fn, tensors, required))
