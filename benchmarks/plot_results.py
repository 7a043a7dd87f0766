"""The benchmarks' JSON results as plots (SVG) and tables for the performance page.

Reads the ``--json`` files of the benchmark scripts from ``benchmarks/results/``
(``registry.json``, ``aggregates.json``, ``stores.json``, ``server.json``; any
may be missing) and writes into ``docs/_static/plots/``:

* ``throughput_<name>.svg``: every rate (ops/s) of a script, trio_aggregates
  beside its baseline (bare Trio, the ``eventsourcing`` library, the echo
  server) and the context rows (floors, tuned peers), on a log scale;
* ``memory_scaling.svg``: resident memory per live aggregate, objects the
  garbage collector tracks per aggregate, and the pause of a full
  ``gc.collect()``, against the number of live aggregates (``bench_registry``'s
  ``scale`` section);
* ``latency.svg``: the protocol server's latency percentiles (p50/p90/p99)
  beside the bare Trio echo server (``bench_server``);
* ``results.inc``: the figures as reStructuredText tables, with the machine
  and the date of each run, included by ``docs/benchmarks.rst``.

The SVG files are committed, so building the docs needs no matplotlib; they
are written reproducibly (no date, fixed ids), so an unchanged result gives an
unchanged file.

Usage (from the project root; matplotlib comes with the ``bench`` extra)::

    .venv/bin/python benchmarks/plot_results.py          # plot the committed results
    .venv/bin/python benchmarks/plot_results.py --run    # run every benchmark, then plot
    .venv/bin/python benchmarks/plot_results.py --run --quick --results /tmp/r --out /tmp/p

``--run`` runs the four scripts one after the other (the full sizes take about
half an hour, mostly the 1,000,000-aggregate memory points and the server's
cells; ``--quick`` a few minutes) on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
PLOTS = ROOT / "docs" / "_static" / "plots"

#: The scripts, in the order they run and appear.
BENCHMARKS = ("registry", "aggregates", "stores", "server")

#: Colours: trio_aggregates, its baseline, context rows (floors, tuned peers).
OURS = "#3b5bdb"
BASELINE = "#868e96"
CONTEXT = "#ced4da"
SIDES = {  # bench_registry's scale sides: label, colour
    "bare": ("bare Trio (task + channel + dict)", BASELINE),
    "registry": ("trio_aggregates registry", OURS),
    "aggregates": ("event-sourced Account (+ its events in memory)", "#2f9e44"),
}


# -- running -------------------------------------------------------------------------


def run_benchmarks(results: Path, quick: bool) -> None:
    """Run every benchmark script with ``--json`` into ``results``."""
    results.mkdir(parents=True, exist_ok=True)
    for name in BENCHMARKS:
        command = [sys.executable, str(HERE / f"bench_{name}.py"), "--json"]
        command.append(str(results / f"{name}.json"))
        if quick:
            command.append("--quick")
        print("$", " ".join(command), flush=True)
        subprocess.run(command, cwd=ROOT, check=True)


def load_results(results: Path) -> dict[str, dict[str, Any]]:
    """The JSON file of each benchmark found in ``results``."""
    found = {}
    for name in BENCHMARKS:
        path = results / f"{name}.json"
        if path.is_file():
            found[name] = json.loads(path.read_text())
    return found


# -- plotting ------------------------------------------------------------------------


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        sys.exit("matplotlib is needed: pip install -e '.[bench]'")
    matplotlib.use("svg")
    matplotlib.rcParams.update(
        {
            "svg.hashsalt": "trio_aggregates",  # fixed ids: reproducible files
            "svg.fonttype": "none",  # text stays text (the browser's sans-serif)
            "font.family": "sans-serif",
            "font.size": 10,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.color": "#e9ecef",
            "axes.axisbelow": True,
        }
    )
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="svg", bbox_inches="tight", metadata={"Date": None})
    print(f"wrote {_shown(path)}")


def _shown(path: Path) -> Path:
    """``path`` relative to the project root, when it is inside it."""
    path = path.resolve()
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def _wrap(text: str, width: int = 48) -> str:
    return "\n".join(textwrap.wrap(text.strip(), width))


def _rate(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.2f}M/s"
    if value >= 1e3:
        return f"{value / 1e3:.1f}k/s"
    return f"{value:.0f}/s"


def _baseline_of(title: str, default: str) -> tuple[str, str]:
    """``("eventsourcing (default Application)", "deposit, ...")`` from a row title."""
    if title.startswith("vs ") and ":" in title:
        who, rest = title[3:].split(":", 1)
        return who.strip(), rest.strip()
    return default, title


def _strip_unit(title: str) -> str:
    """A row title without its unit (``"... (round trips/s)"`` -> ``"..."``)."""
    return re.sub(r"\s*\([^()]*/s\)", "", title).strip()


def throughput_rows(data: Mapping[str, Any]) -> list[tuple[str, float, str, str]]:
    """Bars for one script: ``(label, value, colour, annotation)``, top to bottom."""
    rows: list[tuple[str, float, str, str]] = []
    default = data.get("baseline_label", "bare Trio")
    for c in data["comparisons"]:
        if c["unit"] != "ops/s":
            continue
        baseline, what = _baseline_of(c["title"], default)
        what = _strip_unit(what)
        ours = f"{what}: trio_aggregates"
        if not (rows and rows[-2][0] == ours and rows[-2][1] == c["library"]):
            rows.append((ours, c["library"], OURS, ""))
        # The ratio goes beside the baseline it is a ratio to.
        rows.append((baseline, c["bare"], BASELINE, f"ours {c['ratio']:.2f}x this"))
    for x in data["context"]:
        if x["unit"] != "ops/s":
            continue
        rel = x.get("relative")
        note = "" if rel is None else f"ours {rel:.2f}x this"
        rows.append((_strip_unit(x["title"]), x["value"], CONTEXT, note))
    return rows


def plot_throughput(plt: Any, name: str, data: Mapping[str, Any], out: Path) -> None:
    rows = throughput_rows(data)
    if not rows:
        return
    labels = [_wrap(r[0], 50) for r in rows]
    lines = sum(label.count("\n") + 1 for label in labels)
    fig, ax = plt.subplots(
        figsize=(9.0, 0.2 * lines + 0.12 * len(rows) + 1.0), layout="constrained"
    )
    ys = list(range(len(rows)))[::-1]
    ax.barh(ys, [r[1] for r in rows], color=[r[2] for r in rows], height=0.7)
    ax.set_yticks(ys, labels, fontsize=9)
    ax.set_xscale("log")
    ax.grid(axis="y", visible=False)
    top = max(r[1] for r in rows)
    ax.set_xlim(right=top * 6)
    for y, (_, value, _, note) in zip(ys, rows, strict=True):
        text = _rate(value) + (f"   {note}" if note else "")
        ax.text(value * 1.08, y, text, va="center", fontsize=9)
    ax.set_xlabel("operations per second (log scale; blue: trio_aggregates; grey: its baseline;"
                  " light: context)", fontsize=8)  # fmt: skip
    ax.set_title(f"bench_{name}.py: throughput", loc="left", fontsize=10)
    _save(fig, out / f"throughput_{name}.svg")
    plt.close(fig)


def plot_scaling(plt: Any, data: Mapping[str, Any], out: Path) -> None:
    points = data.get("scaling") or []
    if not points:
        return
    fig, axes = plt.subplots(1, 3, figsize=(9.6, 3.4))
    panels = (
        ("rss_bytes_per_aggregate", "resident memory per aggregate (KiB)", 1 / 1024, False),
        ("gc_objects_per_aggregate", "GC-tracked objects per aggregate", 1, False),
        ("gc_full_s", "full gc.collect() pause (s)", 1, True),
    )
    for ax, (key, title, scale, loglog) in zip(axes, panels, strict=True):
        notes: list[str] = []  # the figures at the largest size
        for side, (label, colour) in SIDES.items():
            mine = sorted((p for p in points if p["side"] == side), key=lambda p: p["n"])
            if not mine:
                continue
            xs = [p["n"] for p in mine]
            ys = [p[key] * scale for p in mine]
            ax.plot(xs, ys, "o-", color=colour, label=label)
            last = mine[-1]
            if key == "rss_bytes_per_aggregate":
                notes.append(f"{side}: {last['rss_total_bytes'] / 2**30:.1f} GiB")
            elif key == "gc_full_s":
                notes.append(f"{side}: {last[key]:.1f} s")
        biggest = max(p["n"] for p in points)
        if key == "gc_full_s":
            frozen = max(p["gc_full_frozen_s"] for p in points)
            notes.append(f"after gc.freeze(): at most {frozen * 1e6:.0f} µs")
        if notes:
            heading = "in all" if key == "rss_bytes_per_aggregate" else "pause"
            ax.text(0.97, 0.03, f"{heading} at {biggest:,}:\n" + "\n".join(notes),
                    transform=ax.transAxes, ha="right", va="bottom", fontsize=8)  # fmt: skip
        ax.set_xscale("log")
        if loglog:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        ax.set_xlabel("live aggregates")
        ax.set_title(title, loc="left", fontsize=10)
    handles, labels = axes[2].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.12))  # fmt: skip
    fig.tight_layout()
    _save(fig, out / "memory_scaling.svg")
    plt.close(fig)


def plot_latency(plt: Any, data: Mapping[str, Any], out: Path) -> None:
    best = data.get("best") or {}
    if not best:
        return
    depths = sorted({int(name.rsplit("_d", 1)[1]) for name in best})
    fig, axes = plt.subplots(1, len(depths), figsize=(5.2 * len(depths), 3.8), squeeze=False)
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    # Percentiles light to dark; the echo server (the baseline) in greys.
    shades = {"p50_us": "#a5b4fc", "p90_us": "#5c7cfa", "p99_us": "#364fc7"}
    greys = {"p50_us": "#dee2e6", "p90_us": "#adb5bd", "p99_us": "#6c757d"}
    for ax, depth in zip(axes[0], depths, strict=True):
        names = [n for n in best if n.endswith(f"_d{depth}")]
        width = 0.26
        for i, key in enumerate(shades):
            xs = [j + (i - 1) * width for j in range(len(names))]
            values = [best[n][key] / 1000 for n in names]
            colours = [greys[key] if n.startswith("echo_") else shades[key] for n in names]
            ax.bar(xs, values, width=width, color=colours, label=key.split("_")[0])

        ax.set_xticks(
            range(len(names)),
            [n.rsplit("_d", 1)[0].replace("_", "\n") for n in names],
            fontsize=8,
        )
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(axis="x", visible=False)
        conns = data.get("parameters", {}).get("connections", 100)
        ax.set_title(f"{conns} connections x {depth} in flight", loc="left", fontsize=10)
        ax.set_ylabel("latency (ms, log scale)")
    handles = [Patch(color=c, label=k.split("_")[0]) for k, c in shades.items()]
    handles.append(Patch(color=greys["p90_us"], label="the same for the echo server"))
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.06))  # fmt: skip
    fig.tight_layout()
    _save(fig, out / "latency.svg")
    plt.close(fig)


# -- the tables (reStructuredText) -----------------------------------------------------


def _fmt(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if unit == "ops/s":
        return _rate(value)
    if unit == "ns":
        return f"{value / 1e3:.2f} µs" if value >= 1e3 else f"{value:.0f} ns"
    if unit == "bytes":
        return f"{value:,.0f} B"
    return f"{value:.4g} {unit}"


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("*", "\\*").replace("`", "'").strip() or " "


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], widths: str) -> list[str]:
    lines = [".. list-table::", "   :header-rows: 1", f"   :widths: {widths}", ""]
    for row in [header, *rows]:
        for n, cell in enumerate(row):
            lines.append(f"   {'*' if n == 0 else ' '} - {_cell(cell)}")
    return [*lines, ""]


def machine_line(data: Mapping[str, Any]) -> str:
    m = data["metadata"]
    load = m.get("loadavg_start") or [math.nan]
    end = m.get("loadavg_end") or [math.nan]
    commit = str(m.get("git_commit") or "?")[:10]
    return (
        f"``{data['benchmark']}{' --quick' if data.get('quick') else ''}``, {m['date']}:"
        f" Python {m['python']}, Trio {m['trio']}, {m.get('cpu')} x{m.get('cpu_count')},"
        f" load average {load[0]:.1f} at the start and {end[0]:.1f} at the end,"
        f" {m.get('duration_s', 0):.0f} s, commit ``{commit}``."
    )


def results_rst(found: Mapping[str, Mapping[str, Any]]) -> str:
    """The figures as list-tables, one per script, each with its machine line."""
    out = [".. This file is written by benchmarks/plot_results.py: do not edit.", ""]
    for name, data in found.items():
        out += [f"``bench_{name}.py``", "~" * (len(name) + 14), ""]
        rows = []
        default = data.get("baseline_label", "bare Trio")
        for c in data["comparisons"]:
            baseline, what = _baseline_of(c["title"], default)
            target = "" if c["target"] is None else f"{c['target_op']} {c['target']:g}x"
            verdict = {True: "met", False: "missed", None: ""}[c["met"]]
            rows.append(
                (
                    what,
                    f"{baseline}: {_fmt(c['bare'], c['unit'])}",
                    _fmt(c["library"], c["unit"]),
                    f"{c['ratio']:.2f}x" if c["ratio"] is not None else "n/a",
                    f"{target} {verdict}".strip(),
                )
            )
        out += _table(
            ("figure", "baseline", "trio_aggregates", "ratio", "target"), rows, "44 20 14 8 14"
        )
        context = [
            (
                x["title"],
                _fmt(x["value"], x["unit"]),
                "" if x.get("relative") is None else f"{x['relative']:.2f}x",
                x.get("note") or "",
            )
            for x in data["context"]
        ]
        if context:
            out += _table(("context", "value", "ours vs this", "note"), context, "45 15 12 28")
        out += [machine_line(data), ""]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--run", action="store_true", help="run every benchmark first")
    parser.add_argument("--quick", action="store_true", help="with --run: the --quick sizes")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the JSON files' folder")
    parser.add_argument("--out", type=Path, default=PLOTS, help="where the plots go")
    args = parser.parse_args(argv)
    if args.run:
        run_benchmarks(args.results, args.quick)
    found = load_results(args.results)
    if not found:
        parser.error(f"no results in {args.results} (run with --run)")
    plt = _pyplot()
    for name, data in found.items():
        plot_throughput(plt, name, data, args.out)
    if "registry" in found:
        plot_scaling(plt, found["registry"], args.out)
    if "server" in found:
        plot_latency(plt, found["server"], args.out)
    (args.out / "results.inc").write_text(results_rst(found) + "\n")
    print(f"wrote {_shown(args.out / 'results.inc')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
