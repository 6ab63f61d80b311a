"""When evaluation may skip distribution validation: never where it could change a result.

:func:`~pyro_ladder.evaluate` scores one batch of data in several passes of ``S`` draws.
Pyro's and torch's validation of the distributions in a pass (arguments in their support,
values in the support, shapes that fit) changes no number: it only raises. It costs a
comparison and a reduction per parameter tensor of every site in every pass: about 2 % of
evaluation time on the paper's network built with Pyro's Normals (the ladder's own
Gaussians skip it since :func:`~pyro_ladder.layers.gaussian`; a user's pair keeps it). So
the passes of a batch after the first run with validation off, under two conditions that
make the skipped checks redundant:

* **every site's checks only refuse what already gives NaN**, and no site is masked (a
  mask turns a masked entry's NaN log-density into 0). That holds for a Normal
  (``loc`` real, ``scale`` positive, ``value`` real: a NaN ``loc`` or ``value``, or a
  ``scale <= 0``, makes ``log_prob`` NaN, which :func:`~pyro_ladder.evaluate` refuses as
  non-finite) and, trivially, for a distribution built with ``validate_args=False``, which
  checks nothing either way; :class:`~torch.distributions.Independent` adds no check of its
  own. Any other family (an ``Exponential`` scored at a negative draw has a finite, wrong
  log-density) keeps validation in every pass;
* **the pass has the shapes of a validated one**: the shape checks depend on shapes alone,
  so a pass is compared, site by site (names, families, batch, event and value shapes),
  with a validated pass of the same number of draws (the last pass of a batch may hold
  fewer). A pass that differs (a pair whose sites change with the draws) is run again with
  validation on and the random state it started from, so its draws are the same.

The user's settings (Pyro's three validation flags and torch's default) are restored after
each pass, also when it raises.
"""

from __future__ import annotations

import contextlib

import pyro
import pyro.distributions as dist
import pyro.infer
import pyro.poutine
import torch
from torch.distributions import Distribution, Independent

from ._traces import sample_sites
from .layers import Normal as LadderNormal

# families whose validation refuses only what makes log_prob NaN (module docstring)
_NAN_ON_INVALID = (torch.distributions.Normal, dist.Normal, LadderNormal)


def signature(*traces) -> tuple | None:
    """What validating the sites of ``traces`` checks besides NaN: the sites' names,
    families and shapes; ``None`` when some site's checks refuse more than NaN (then every
    pass is validated)."""
    sites = []
    for trace in traces:
        for name, site in sample_sites(trace):
            fn = site["fn"]
            if not _only_nan(fn) or site["mask"] is not None:
                # a mask replaces a masked entry's log-density, NaN or not, by 0: there
                # validation is the only check left
                return None
            shapes = (fn.batch_shape, fn.event_shape, site["value"].shape)
            sites.append((name, _families(fn), shapes, site["is_observed"]))
    return tuple(sites)


def _only_nan(fn) -> bool:
    """Does validating ``fn`` refuse only inputs that make its ``log_prob`` NaN?"""
    while type(fn) in (Independent, dist.Independent):
        fn = fn.base_dist
    return type(fn) in _NAN_ON_INVALID or fn.__dict__.get("_validate_args") is False


def _families(fn) -> tuple:
    chain = [type(fn)]
    while isinstance(fn, Independent):
        fn = fn.base_dist
        chain.append(type(fn))
    return tuple(chain)


@contextlib.contextmanager
def validation_off():
    """Pyro's and torch's distribution validation off inside the block; every flag as it
    was after it (torch's default too, which may differ from Pyro's)."""
    flags = (
        dist.is_validation_enabled(),
        pyro.infer.is_validation_enabled(),
        pyro.poutine.is_validation_enabled(),
        Distribution._validate_args,
    )
    try:
        pyro.enable_validation(False)
        yield
    finally:
        dist.enable_validation(flags[0])
        pyro.infer.enable_validation(flags[1])
        pyro.poutine.enable_validation(flags[2])
        Distribution._validate_args = flags[3]
