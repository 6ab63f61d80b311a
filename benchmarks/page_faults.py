"""Minor page faults and time per training step, glibc's malloc kept or at its defaults.

``python -m benchmarks.page_faults [--threads N] [--repeats R]`` runs, for each setting in
a fresh process (malloc's thresholds are per process), the paper network on 2048 random
binary rows (a small data set, as in a first notebook), and times library and reference
steps interleaved, counting the minor page faults (``ru_minflt``) of each step. Writes
``benchmarks/results/page-faults-threads<N>.json``. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _measure(malloc: str, threads: int, repeats: int) -> dict:
    """In this process: median ms and mean faults per step of library and reference."""
    import torch

    from benchmarks import run
    from pyro_ladder.allocator import keep_freed_memory, malloc_setting

    if malloc == "kept":
        keep_freed_memory()
    torch.set_num_threads(threads)
    run.DEVICE = torch.device("cpu")
    data = (torch.rand(2048, 784, generator=torch.Generator().manual_seed(0)) < 0.2).float()
    out = {"malloc": malloc_setting()}
    for estimator, k in (("elbo", 1), ("iwae", 5), ("iwae-dreg", 5)):
        batch_norm = estimator != "iwae-dreg"  # which refuses it in training mode
        vae, ref = run._pair(784, (64, 32, 16, 8, 4), (512, 256, 128, 64, 32), 0, batch_norm)
        fns = run._train_fns(vae, ref, estimator, k, run._Batches(data, 256), detail=False)
        t = run._interleaved(fns, repeats, warmup=3)  # medians, faults counted per call
        out[estimator] = {
            f"{name}_{what}": value
            for name in fns
            for what, value in (("ms", 1e3 * t[name]), ("faults", t[f"{name}_faults"]))
        }
        row = out[estimator]
        row["ratio"] = row["library_ms"] / row["reference_ms"]
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.page_faults")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--child", choices=("kept", "default"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_measure(args.child, args.threads, args.repeats)))
        return {}
    env = {k: v for k, v in os.environ.items() if k != "PYRO_LADDER_MALLOC"}
    results = {"command": "python -m benchmarks.page_faults " + " ".join(sys.argv[1:])}
    results["load_average_start"] = os.getloadavg()
    for malloc in ("default", "kept"):
        argv = [sys.executable, "-m", "benchmarks.page_faults", "--child", malloc]
        argv += ["--threads", str(args.threads), "--repeats", str(args.repeats)]
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
        results[malloc] = json.loads(done.stdout.strip().splitlines()[-1])
    results["load_average_end"] = os.getloadavg()
    print("malloc   estimator   library ms  reference ms  ratio  faults/step library  reference")
    for malloc in ("default", "kept"):
        for estimator in ("elbo", "iwae", "iwae-dreg"):
            r = results[malloc][estimator]
            print(
                f"{malloc:8s} {estimator:10s} {r['library_ms']:11.1f} {r['reference_ms']:13.1f}"
                f" {r['ratio']:6.3f} {r['library_faults']:20.0f} {r['reference_faults']:10.0f}"
            )
    name = f"page-faults-threads{args.threads}.json"
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / name
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
