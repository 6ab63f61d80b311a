"""The Performance tables of ``docs/performance.md``, made from the runner's JSON.

``python -m benchmarks.table benchmarks/results/*.json --write docs/performance.md``
replaces what lies between the page's ``<!-- benchmarks:table -->`` and
``<!-- /benchmarks:table -->`` markers with one table per file (its conditions first);
without ``--write`` it prints the tables. Nothing in the tables is typed by hand.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

START, END = "<!-- benchmarks:table -->", "<!-- /benchmarks:table -->"


def conditions(c: dict) -> str:
    """One line: what ran where, under which load."""
    load = f"load average {c['load_average_start'][0]:.1f} at the start, "
    load += f"{c['load_average_end'][0]:.1f} at the end" if "load_average_end" in c else "?"
    malloc = {"kept": "glibc's malloc keeping freed memory", "default": "glibc's malloc defaults"}
    kept = f", {malloc[c['malloc']]}" if c.get("malloc") in malloc else ""
    if c.get("reference_bernoulli") == "library":
        kept += ", the reference given the library's Bernoulli log-density"
    cpu = ""
    if "cpu_name" in c:  # recorded since the second machine (older files lack it)
        cpu = f"{c['cpu_name']} with {c['cpu_capability']}, "
        cpu += f"{c['gemm_gflops']:.0f} GFLOP/s in float32 products at that thread count, "
    return (
        f"`{c['command']}` on {c.get('device', 'cpu')} ({c.get('device_name') or c['machine']}, "
        f"{cpu}{c['cpu_count']} cores), {c['threads']} torch thread(s), torch {c['torch']}, "
        f"Pyro {c['pyro']}{kept}, {c['started']}; {load}."
    )


def rows(results: dict) -> list[list[str]]:
    """``[measured, library, reference, ratio, ratio of CPU time, target]`` per row."""
    out = []
    for r in results.get("train", []):
        name = f"`{r['estimator']}`" + (f", K={r['particles']}" if r["particles"] > 1 else "")
        if r.get("kind") == "fixed cost":
            what = f"fixed cost per step, {name} (8-unit layers, batch {r['batch']})"
            out.append(_row(what, r, "library_ms", "reference_ms", None))
            continue
        out.append(_row(f"training step, {name}", r, "library_ms", "reference_ms", r.get("target")))
        if "library_pyro_adam_ms" in r:
            out.append(
                _row(
                    "... with `pyro.optim.Adam`",
                    r,
                    "library_pyro_adam_ms",
                    "reference_ms",
                    r.get("target"),
                    cpu=False,
                )
            )
        if "reference_fused_ms" in r:
            what = "... against a reference with torch's fused Adam"
            out.append(_row(what, r, "library_ms", "reference_fused_ms", None, cpu=False))
    ev = results.get("eval")
    if ev:
        what = f"evaluation, K={ev['samples']}, {ev['images']} images"
        out.append(_row(what, ev, "library_s", "reference_s", ev.get("target"), unit="s"))
        out.append(
            [
                "peak resident memory of that evaluation",
                f"{ev['library_peak_rss_mb']:.0f} MB",
                f"{ev['reference_peak_rss_mb']:.0f} MB",
                "",
                "",
                "",
            ]
        )
    for r in results.get("compiled", []):
        name = f"`{r['estimator']}`" + (f", K={r['particles']}" if r["particles"] > 1 else "")
        what = f"compiled step ({r['backend']}), {name}"
        out.append(
            _row(
                what + ", against the eager reference",
                r,
                "library_ms",
                "reference_ms",
                0.80,
                cpu=False,
            )
        )
        out.append(
            _row(
                what + ", against the compiled reference",
                r,
                "library_ms",
                "reference_compiled_ms",
                1.05,
                cpu=False,
            )
        )
        if "reference_compiled_eager_draws_ms" in r:  # the reference drawing as the library
            out.append(
                _row(
                    what + ", against the compiled reference drawing with torch's generator",
                    r,
                    "library_ms",
                    "reference_compiled_eager_draws_ms",
                    1.05,
                    cpu=False,
                )
            )
        pays = r["pays_off_after"]
        out.append(
            [
                f"compile time, {name}",
                f"{r['library_compile_s']:.0f} s",
                f"{r['reference_compile_s']:.0f} s",
                "",
                "",
                f"eager library {r['library_eager_ms']:.1f} ms: "
                + (f"pays off after {pays} steps" if pays else "does not pay off"),
            ]
        )
    return out


def _row(what, r, lib, ref, target, unit="ms", cpu=True) -> list[str]:
    ratio = r[lib] / r[ref]
    cpu_ratio = r.get("cpu_ratio") if cpu else None
    met = "" if target is None else ("yes" if ratio <= target else "**no**")
    fmt = "{:.1f} ms" if unit == "ms" else "{:.2f} s"
    return [
        what,
        fmt.format(r[lib]),
        fmt.format(r[ref]),
        f"{ratio:.2f}",
        "" if cpu_ratio is None else f"{cpu_ratio:.2f}",
        "" if target is None else f"<= {target:.2f} {met}",
    ]


def markdown(path: Path) -> str:
    results = json.loads(path.read_text())
    head = ["measured", "library", "reference", "ratio", "ratio, CPU time", "target"]
    lines = [f"**{path.name}**: {conditions(results['conditions'])}", ""]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    lines += ["| " + " | ".join(cells) + " |" for cells in rows(results)]
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.table", description=__doc__)
    parser.add_argument("results", nargs="+", type=Path, help="JSON files of the runner")
    parser.add_argument("--write", type=Path, help="a page with the table markers")
    args = parser.parse_args(argv)
    tables = "\n\n".join(markdown(p) for p in args.results)
    if args.write is None:
        print(tables)
        return tables
    page = args.write.read_text()
    if START not in page or END not in page:
        parser.error(f"{args.write} has no {START} ... {END} markers")
    before, rest = page.split(START, 1)
    after = rest.split(END, 1)[1]
    args.write.write_text(f"{before}{START}\n{tables}\n{END}{after}")
    return tables


if __name__ == "__main__":
    main()
