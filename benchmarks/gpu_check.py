"""The measuring parts of ``benchmarks/gpu_check.sh``, one per call, each writing a JSON.

    python3 benchmarks/gpu_check.py env     --device cuda --out env.json
    python3 benchmarks/gpu_check.py fit     --device cuda --out fit.json  [--tiny]
    python3 benchmarks/gpu_check.py eval    --device cuda --out eval.json [--tiny]
    python3 benchmarks/gpu_check.py summary --work DIR --out gpu_check.json

``fit``: :func:`pyro_ladder.fit` on binarized MNIST with ``device=``, the paper network,
``elbo`` and ``iwae-dreg`` (K=5, without batch norm, which it refuses): seconds per step
after a warm-up epoch, the loss.
``eval``: the K=5000 log-likelihood of test images by the library and by the plain-PyTorch
reference (``benchmarks/reference.py``) at several pass sizes (``max_rows``), images per
second and the GPU's peak memory. ``summary`` gathers the parts' JSON files, the shell's
exit codes and log tails, into one JSON. Run from the repository root.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PAPER = dict(latent=(64, 32, 16, 8, 4), hidden=(512, 256, 128, 64, 32))
SMALL = dict(latent=(8, 4), hidden=(64, 32))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_check.py")
    parser.add_argument("part", choices=["env", "fit", "eval", "summary"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--data-dir", default=".gpu_data")
    parser.add_argument("--tiny", action="store_true", help="small sizes, for a dry run")
    parser.add_argument("--work", default=None, help="summary: the folder of the parts")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    result = PARTS[args.part](args)
    Path(args.out).write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(json.dumps(result, default=str)[:2000])


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_env(args) -> dict:
    import platform

    import torch

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import pyro

        out["pyro"] = pyro.__version__
    except ImportError as error:
        out["pyro"] = f"missing: {error}"
    if torch.cuda.is_available():
        out.update(
            torch_cuda=torch.version.cuda,
            device_name=torch.cuda.get_device_name(0),
            device_count=torch.cuda.device_count(),
            memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30,
        )
    return out


def _mnist(args):
    import torch

    from pyro_ladder.data import binarize, load_dataset

    if args.tiny and not (Path(args.data_dir) / "binarized_mnist").is_dir():
        # the embedded digits: a dry run needs no data files
        ds = load_dataset("digits")
        gen = torch.Generator().manual_seed(0)
        return binarize(ds.train, generator=gen), binarize(ds.test, generator=gen)
    ds = load_dataset("binarized-mnist", args.data_dir, download=False)
    return ds.train.float(), ds.test.float()


def _ladder(x_dim, device, tiny, seed=0, batch_norm=True):
    import pyro
    import torch

    from pyro_ladder import LadderVAE, preset

    pyro.clear_param_store()
    torch.manual_seed(seed)
    size = SMALL if tiny else PAPER
    config = preset(
        "paper-mnist",
        x_dim,
        latent_dims=size["latent"],
        hidden_dims=size["hidden"],
        batch_norm=batch_norm,
    )
    return LadderVAE.from_config(config).to(device)


def run_fit(args) -> dict:
    """Seconds per training step of ``fit(device=...)``; the data start on the host."""
    import torch

    from pyro_ladder import fit

    device = torch.device(args.device)
    train, _ = _mnist(args)
    batch = 16 if args.tiny else 256
    rows = train[: batch * (4 if args.tiny else 100)]  # 100 steps per epoch
    out = {"device": str(device), "batch_size": batch, "steps_per_epoch": len(rows) // batch}
    for name, k in [("elbo", 1), ("iwae-dreg", 5)]:
        # iwae-dreg refuses batch norm in training mode (pyro_ladder/elbo/coupling.py)
        vae = _ladder(train.shape[1], device, args.tiny, batch_norm=name != "iwae-dreg")
        times = []
        history = fit(
            vae.model,
            vae.guide,
            rows,
            elbo=name,
            num_particles=k,
            epochs=3,
            batch_size=batch,
            progress=False,
            callback=lambda r, t=times: (_sync(device), t.append(time.perf_counter())),
        )
        epoch_s = [b - a for a, b in zip(times, times[1:], strict=False)]  # epochs 2 and 3
        out[f"{name}_k{k}"] = {
            "step_ms": 1e3 * min(epoch_s) / out["steps_per_epoch"],
            "loss": [r["loss"] for r in history],
            "on_device": all(p.device.type == device.type for p in vae.parameters()),
        }
        if device.type == "cuda":
            try:  # a diagnostic: its failure must not lose the timings above
                syncs = _host_syncs(vae, rows[:batch].to(device), name, k)
            except Exception as error:  # noqa: BLE001
                syncs = {"error": repr(error)}
            out[f"{name}_k{k}"]["host_syncs"] = syncs
    return out


def _host_syncs(vae, batch, name, k, steps=3) -> dict:
    """Where one ``SVI.step`` makes the host wait for the GPU: CUDA's sync debug mode warns
    at each such call; counted per step by the Python line that made it."""
    import collections
    import warnings

    import torch
    from pyro.infer import SVI

    from pyro_ladder import make_elbo
    from pyro_ladder.optim import Adam

    svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-3}), make_elbo(name, k))
    svi.step(batch)  # first call: Pyro guesses the plate nesting
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                svi.step(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    where = collections.Counter(f"{w.filename}:{w.lineno}" for w in caught)
    return {
        "per_step": len(caught) / steps,
        "by_line": {line: n / steps for line, n in where.most_common(15)},
    }


def run_eval(args) -> dict:
    """K=5000 log-likelihood: library against reference at several pass sizes."""
    import torch

    from benchmarks.reference import ReferenceLadder
    from pyro_ladder import evaluate

    device = torch.device(args.device)
    _, test = _mnist(args)
    k, n = (50, 8) if args.tiny else (5000, 100)
    x = test[:n].to(device)
    vae = _ladder(x.shape[1], device, args.tiny)
    ref = ReferenceLadder.from_library(vae.cpu()).to(device)
    vae.to(device)
    rows_options = [None, 4096, 16384, 65536, 262144] if not args.tiny else [None, 64]
    out = {"device": str(device), "images": n, "samples": k, "rows": []}
    for max_rows in rows_options:
        row = {"max_rows": max_rows}
        for which in ("library", "reference"):
            if which == "reference" and max_rows is None:
                continue  # the reference's own default is the CPU's 4096
            rows = {} if max_rows is None else {"max_rows": max_rows}
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = []
            for _ in range(2):  # the first pass warms up kernels and the allocator
                start = time.perf_counter()
                if which == "library":
                    ll = evaluate(vae.model, vae.guide, x, num_samples=k, **rows)["log_likelihood"]
                else:
                    ll = ref.log_likelihood(x, k, **rows)
                _sync(device)
                seconds.append(time.perf_counter() - start)
            row[f"{which}_s"] = min(seconds)
            row[f"{which}_images_per_s"] = n / min(seconds)
            row[f"{which}_mean_ll"] = float(ll.mean())
            if device.type == "cuda":
                row[f"{which}_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if "reference_s" in row:
            row["ratio"] = row["library_s"] / row["reference_s"]
        out["rows"].append(row)
        print(row, flush=True)
    return out


def run_summary(args) -> dict:
    """Every part's JSON, exit code and (when it failed) log tail, in one dict."""
    work = Path(args.work)
    out = {"parts": {}}
    for status in sorted(work.glob("*.status")):
        part = status.stem
        rc, ms = status.read_text().split()
        entry = {"rc": int(rc), "seconds": int(ms) / 1000, "timed_out": int(rc) in (124, 137)}
        result = work / f"{part}.json"
        if result.exists():
            try:
                entry["result"] = json.loads(result.read_text())
            except json.JSONDecodeError as error:
                entry["result_error"] = str(error)
        log = work / f"{part}.log"
        if log.exists():
            lines = log.read_text().strip().splitlines()
            entry["last_line"] = lines[-1] if lines else ""  # pytest's counts, say
            if int(rc) != 0:
                entry["log_tail"] = "\n".join(lines)[-3000:]
        entry["ok"] = int(rc) == 0
        out["parts"][part] = entry
    for skipped in sorted(work.glob("*.skipped")):
        out["parts"][skipped.stem] = {"ok": False, "skipped": skipped.read_text().strip()}
    out["all_ok"] = all(p.get("ok") for p in out["parts"].values())
    return out


PARTS = {"env": run_env, "fit": run_fit, "eval": run_eval, "summary": run_summary}

if __name__ == "__main__":
    main()
