"""The matrix products of a training step alone: the floor under any implementation of it.

``python -m benchmarks.floor [--threads N] [--repeats R] [--out FILE.json] [--tiny]``
records every matrix product (``aten.mm``, ``addmm``, ``bmm``, ``baddbmm``) that one
training step of the hand-written reference dispatches (forward, backward and Adam, on the
runner's network and batch), then replays those products alone on fresh tensors of the same
sizes and strides, interleaved with the reference's eager step. Their time is a floor for
any implementation with the same arithmetic: a compiled step fuses and removes the rest
(elementwise operations, reductions, Python) but still multiplies these matrices, so a
step can be no faster than ``floor_ms``, and no more than ``floor_ratio`` of the eager
reference's step. The matrix products are counted in floating-point operations too
(``gflops``: what the replay reached).

The data are random binary images (the arithmetic's cost does not depend on them).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import _report, run

_aten = torch.ops.aten
PRODUCTS = (_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default)
ESTIMATORS = (("elbo", 1), ("iwae", None), ("iwae-dreg", None))  # None: the runner's K


class _Products(TorchDispatchMode):
    """Records each matrix product dispatched inside it: the operation, each tensor
    argument's size, stride and dtype, the other arguments as they are."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in PRODUCTS:
            spec = [
                (tuple(a.shape), a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a
                for a in args
            ]
            self.calls.append((func, spec, dict(kwargs)))
        return func(*args, **kwargs)


def _flops(func, spec) -> int:
    """Multiply-adds times two of one recorded product."""
    a, b = spec[-2][0], spec[-1][0]  # the two matrices (addmm/baddbmm: after the input)
    batch = a[0] if len(a) == 3 else 1
    return 2 * batch * a[-2] * a[-1] * b[-1]


def _replay(calls):
    """A function running the recorded products on fresh tensors of the same layout."""
    gen = torch.Generator().manual_seed(0)
    ops = []
    for func, spec, kwargs in calls:
        args = [
            torch.empty_strided(s[0], s[1], dtype=s[2], device=run.DEVICE).normal_(generator=gen)
            if isinstance(s, tuple) and len(s) == 3 and isinstance(s[2], torch.dtype)
            else s
            for s in spec
        ]
        ops.append((func, args, kwargs))

    def products():
        for func, args, kwargs in ops:
            func(*args, **kwargs)

    return products


def _row(size, estimator, k, repeats) -> dict:
    batch_norm = estimator != "iwae-dreg"  # as the runner's training rows
    vae, ref = run._pair(size["x_dim"], size["latent"], size["hidden"], 0, batch_norm)
    gen = torch.Generator().manual_seed(1)
    x = (torch.rand(size["batch"], size["x_dim"], generator=gen) < 0.2).float().to(run.DEVICE)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-3)
    ref.train_step(opt, x, estimator, k)  # Adam's state exists before the recorded step
    with _Products() as recorder:
        ref.train_step(opt, x, estimator, k)
    products = _replay(recorder.calls)
    t = run._interleaved(
        {"products": products, "step": lambda: ref.train_step(opt, x, estimator, k)},
        repeats,
        warmup=2,
    )
    flops = sum(_flops(func, spec) for func, spec, _ in recorder.calls)
    return {
        "estimator": estimator,
        "particles": k,
        "products": len(recorder.calls),
        "floor_ms": 1e3 * t["products"],
        "reference_step_ms": 1e3 * t["step"],
        "floor_ratio": t["products"] / t["step"],
        "gflops": flops / t["products"] / 1e9,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.floor", description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--tiny", action="store_true", help="the runner's tiny network")
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = dict(run.TINY if args.tiny else run.FULL)
    size["x_dim"] = 64 if args.tiny else 784  # the runner's data sets: digits, MNIST
    result = _report.header("benchmarks.floor", argv, args.threads)
    result.update(
        network={"latent_dims": size["latent"], "hidden_dims": size["hidden"]},
        batch=size["batch"],
        started=time.strftime("%Y-%m-%dT%H:%M:%S"),
        rows=[_row(size, name, k or size["particles"], args.repeats) for name, k in ESTIMATORS],
    )
    return _report.finish(result, args.out, digits=3)


if __name__ == "__main__":
    main()
