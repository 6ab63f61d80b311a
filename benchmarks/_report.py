"""The frame the small benchmarks (``benchmarks.bernoulli``, ``benchmarks.floor``) share:
their JSON's conditions, the rows printed, the file written."""

from __future__ import annotations

import json
import os
import platform
import time

import torch


def header(prog: str, argv, threads: int) -> dict:
    """The conditions a small benchmark records before it measures."""
    return {
        "command": f"python -m {prog} " + " ".join(argv or []),
        "threads": threads,
        "torch": torch.__version__,
        **cpu(threads),
        "load_average_start": os.getloadavg(),
    }


def cpu_name() -> str:
    """The processor's model name (Linux's ``/proc/cpuinfo``; else what Python knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu(threads: int) -> dict:
    """What the CPU is and how fast it multiplies matrices now: its name, the vector
    instructions torch uses, and the GFLOP/s of float32 1024 x 1024 products at ``threads``
    threads (median of 15, after 5 untimed): two machines of the same description can
    differ twofold, and a table's ratios are of its machine."""
    kept = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        a, b = (torch.randn(1024, 1024, generator=gen) for _ in range(2))
        times = []
        for i in range(20):
            start = time.perf_counter()
            torch.mm(a, b)
            if i >= 5:
                times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(kept)
    return {
        "cpu_name": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gemm_gflops": 2 * 1024**3 / sorted(times)[len(times) // 2] / 1e9,
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
