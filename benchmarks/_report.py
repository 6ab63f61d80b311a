"""The frame the small benchmarks (``benchmarks.bernoulli``, ``benchmarks.floor``) share:
their JSON's conditions, the rows printed, the file written."""

from __future__ import annotations

import json
import os

import torch


def header(prog: str, argv, threads: int) -> dict:
    """The conditions a small benchmark records before it measures."""
    return {
        "command": f"python -m {prog} " + " ".join(argv or []),
        "threads": threads,
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_average_start": os.getloadavg(),
    }


def finish(result: dict, out: str | None, digits: int) -> dict:
    """Record the load at the end, print each row (floats to ``digits``), write ``out``."""
    result["load_average_end"] = os.getloadavg()
    for row in result["rows"]:
        print({k: (round(v, digits) if isinstance(v, float) else v) for k, v in row.items()})
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    return result
