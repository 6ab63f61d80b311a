"""The Bernoulli log-density alone: torch's against the library's, on the runner's shapes.

``python -m benchmarks.bernoulli [--threads N] [--out FILE.json]`` times, for logits of an
evaluation chunk (204 draws of 20 images), an ``iwae`` K = 5 step and an ``elbo`` step
(batch 256, 784 pixels), the forward pass ``log p(x | logits)`` summed over pixels, and the
forward and backward pass, with torch's ``-binary_cross_entropy_with_logits`` and with
:class:`pyro_ladder.likelihoods.Bernoulli`; and the elementwise operations they rest on
(``log1p``, ``log``, ``exp``) over the evaluation chunk. Medians over interleaved repeats.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

from benchmarks import _report
from benchmarks.reference import BERNOULLI
from pyro_ladder.likelihoods import Bernoulli

SHAPES = {
    "evaluation chunk": (204, 20, 784),
    "iwae K=5 step": (5, 256, 784),
    "elbo step": (256, 784),
}


_torch = BERNOULLI["torch"]  # the reference's: what a user writes


def _library(logits, x):
    return Bernoulli(logits=logits, validate_args=False).log_prob(x)


def _forward(score, logits, x):
    with torch.inference_mode():
        score(logits, x).sum(-1)


def _backward(score, live, x):
    score(live, x).sum().backward()
    live.grad = None


def _median_ms(fns: dict, repeats: int) -> dict:
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # untimed first call
    for r in range(repeats):
        for name in list(fns) if r % 2 == 0 else list(fns)[::-1]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def _rows(repeats: int) -> list:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for what, shape in SHAPES.items():
        logits = torch.randn(shape, generator=gen) * 3
        x = (torch.rand(shape[-2:], generator=gen) < 0.3).float()
        live = logits.clone().requires_grad_()
        fns = {
            "torch_forward": functools.partial(_forward, _torch, logits, x),
            "library_forward": functools.partial(_forward, _library, logits, x),
            "torch_forward_backward": functools.partial(_backward, _torch, live, x),
            "library_forward_backward": functools.partial(_backward, _library, live, x),
        }
        ms = _median_ms(fns, repeats)
        rows.append({"shape": list(shape), "what": what, **{f"{k}_ms": v for k, v in ms.items()}})
    chunk = torch.randn(SHAPES["evaluation chunk"], generator=gen)
    ops = {
        "log1p": lambda: chunk.abs().log1p(),
        "log": lambda: chunk.abs().log(),
        "exp": lambda: chunk.exp(),
        "abs": lambda: chunk.abs(),
    }
    rows.append({"what": "elementwise, evaluation chunk", **_median_ms(ops, repeats)})
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bernoulli", description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = _report.header("benchmarks.bernoulli", argv, args.threads)
    result["rows"] = _rows(args.repeats)
    return _report.finish(result, args.out, digits=2)


if __name__ == "__main__":
    main()
