"""Shared helpers for the benchmark scripts in this directory.

Every script measures trio_aggregates beside a bare-Trio baseline in the same
process and reports ``library / bare`` ratios. This module gives them:

* :func:`parse_args`: the common command line (``--quick``, ``--json PATH``,
  ``--reps N``, ``--only NAME,...``);
* :func:`interleaved` / :func:`interleaved_async`: best-of-N timing with the
  variants interleaved (and their order rotated) on every repetition, so that
  noise from other processes hits every variant alike;
* :class:`Report`: collects comparisons (bare vs library, with a target ratio)
  and context figures, prints a table and writes the JSON file;
* :func:`metadata`: Python, Trio and machine details for the JSON file.

Run a script from the project root, e.g. ``.venv/bin/python
benchmarks/bench_registry.py --quick``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "apply_reps",
    "Comparison",
    "Context",
    "Report",
    "fmt_bytes",
    "fmt_ns",
    "fmt_rate",
    "gc_disabled",
    "interleaved",
    "interleaved_async",
    "metadata",
    "parse_args",
    "rotate",
    "run_json_process",
]

ROOT = Path(__file__).resolve().parent.parent


# -- command line -----------------------------------------------------------


def parse_args(
    description: str,
    sections: Sequence[str] = (),
    argv: Sequence[str] | None = None,
) -> argparse.Namespace:
    """The common command line of every benchmark script.

    ``--quick`` (finish in under a minute), ``--json PATH`` (write every figure
    there), ``--reps N`` (override the repetition count of every measurement)
    and, if ``sections`` is given, ``--only a,b`` to run some of them.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick", action="store_true", help="smaller sizes and fewer repetitions (< 1 minute)"
    )
    parser.add_argument(
        "--json", metavar="PATH", type=Path, help="write figures, ratios and metadata here"
    )
    parser.add_argument(
        "--reps", type=int, default=None, help="repetitions of each measurement (best of N)"
    )
    if sections:
        parser.add_argument(
            "--only",
            default=",".join(sections),
            help=f"comma-separated sections to run (default: all of {','.join(sections)})",
        )
    args = parser.parse_args(argv)
    if sections:
        chosen = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = sorted(set(chosen) - set(sections))
        if unknown:
            parser.error(f"unknown section(s) {unknown}; choose from {list(sections)}")
        args.only = chosen
    if args.reps is not None and args.reps < 1:
        parser.error("--reps must be at least 1")
    return args


# -- timing -----------------------------------------------------------------


def rotate(names: Sequence[str], rep: int) -> list[str]:
    """``names`` rotated by ``rep``: each variant takes every position in turn."""
    k = rep % len(names) if names else 0
    return list(names[k:]) + list(names[:k])


def interleaved(reps: int, variants: Mapping[str, Callable[[], float]]) -> dict[str, list[float]]:
    """Run every variant ``reps`` times, interleaved; return each one's samples.

    A variant is a function that does its own timing and returns the figure
    (seconds, a rate, ...), so set-up and tear-down stay out of it. The order
    of the variants rotates on every repetition. A full garbage collection
    runs before each sample, so no variant inherits another's garbage.
    """
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(reps):
        for name in rotate(list(variants), rep):
            gc.collect()
            samples[name].append(variants[name]())
    return samples


async def interleaved_async(
    reps: int, variants: Mapping[str, Callable[[], Awaitable[float]]]
) -> dict[str, list[float]]:
    """:func:`interleaved` for async variants (run inside ``trio.run``)."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(reps):
        for name in rotate(list(variants), rep):
            gc.collect()
            samples[name].append(await variants[name]())
    return samples


@contextmanager
def gc_disabled() -> Iterator[None]:
    """Disable the cyclic garbage collector inside the block (restoring its state)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def run_json_process(script: str, *args: str, timeout: float = 3600) -> dict[str, Any]:
    """Run ``script`` with ``args`` in a fresh Python process; return its last line as JSON.

    For measurements that must not inherit the parent's memory (a point of a
    scaling curve, say): the script prints one JSON object as its last line.
    A failure raises ``RuntimeError`` with the child's stderr.
    """
    result = subprocess.run(
        [sys.executable, os.path.abspath(script), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{Path(script).name} {' '.join(args)} failed:\n{result.stderr}")
    figures: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return figures


# -- formatting -------------------------------------------------------------


def fmt_rate(per_second: float) -> str:
    """``65.2k/s`` and friends."""
    if per_second >= 1e6:
        return f"{per_second / 1e6:.2f}M/s"
    if per_second >= 1e3:
        return f"{per_second / 1e3:.1f}k/s"
    return f"{per_second:.0f}/s"


def fmt_ns(ns: float) -> str:
    """A duration given in nanoseconds, in the most readable unit."""
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} µs"
    return f"{ns:.1f} ns"


def fmt_bytes(n: float) -> str:
    """Bytes, as ``4,712 B``."""
    return f"{n:,.0f} B"


_FORMATTERS: dict[str, Callable[[float], str]] = {
    "ns": fmt_ns,
    "ops/s": fmt_rate,
    "bytes": fmt_bytes,
}


def fmt_value(value: float, unit: str) -> str:
    """Format ``value`` in ``unit`` (known units get a readable form)."""
    formatter = _FORMATTERS.get(unit)
    return formatter(value) if formatter else f"{value:.4g} {unit}"


# -- results ----------------------------------------------------------------


@dataclass
class Comparison:
    """The library against the bare-Trio baseline, on one figure.

    ``ratio`` is always ``library / bare`` in ``unit``. With ``better="lower"``
    (time, memory) the target is a maximum; with ``better="higher"`` (rates)
    it is a minimum. ``target=None`` means the figure is for information.
    """

    id: str
    title: str
    unit: str
    better: Literal["lower", "higher"]
    bare: float
    library: float
    target: float | None
    bare_samples: list[float] = field(default_factory=list)
    library_samples: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.library / self.bare if self.bare else math.nan

    @property
    def paired_median(self) -> float:
        """Median of the per-repetition ratios (each pair ran back to back).

        A check on :attr:`ratio` under noise: if the two disagree a lot, other
        load on the machine moved the figures.
        """
        both = zip(self.library_samples, self.bare_samples, strict=True)
        pairs = [lib / bare for lib, bare in both if bare]
        return statistics.median(pairs) if pairs else math.nan

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        if self.better == "lower":
            return self.ratio <= self.target
        return self.ratio >= self.target

    @property
    def target_text(self) -> str:
        if self.target is None:
            return "(info)"
        return f"{'<=' if self.better == 'lower' else '>='} {self.target:g}x"

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["ratio"] = self.ratio
        data["paired_median_ratio"] = self.paired_median
        data["met"] = self.met
        data["target_op"] = (
            None if self.target is None else ("<=" if self.better == "lower" else ">=")
        )
        return data


@dataclass
class Context:
    """A figure shown for context (a floor, a variant), with no target."""

    id: str
    title: str
    unit: str
    value: float
    samples: list[float] = field(default_factory=list)
    note: str = ""
    #: ``value / relative_to``'s value, if given (e.g. the library against a floor)
    relative_to: str | None = None
    relative: float | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def best(samples: Sequence[float], better: Literal["lower", "higher"]) -> float:
    """The best sample: the smallest time, or the highest rate."""
    return min(samples) if better == "lower" else max(samples)


class Report:
    """Collects a script's figures; prints them as a table; writes the JSON file."""

    def __init__(
        self,
        benchmark: str,
        *,
        quick: bool,
        parameters: Mapping[str, Any],
        baseline_label: str = "bare Trio",
    ) -> None:
        self.benchmark = benchmark
        #: the heading of the baseline column ("bare Trio" unless a script says otherwise)
        self.baseline_label = baseline_label
        self.quick = quick
        self.parameters = dict(parameters)
        self.comparisons: list[Comparison] = []
        self.context: list[Context] = []
        self.started = time.time()
        self.meta = metadata()

    def compare(
        self,
        id: str,
        title: str,
        unit: str,
        better: Literal["lower", "higher"],
        bare_samples: Sequence[float],
        library_samples: Sequence[float],
        target: float | None,
        note: str = "",
    ) -> Comparison:
        """Record the best of each side's samples and their ratio."""
        comparison = Comparison(
            id=id,
            title=title,
            unit=unit,
            better=better,
            bare=best(bare_samples, better),
            library=best(library_samples, better),
            target=target,
            bare_samples=list(bare_samples),
            library_samples=list(library_samples),
            note=note,
        )
        self.comparisons.append(comparison)
        return comparison

    def add_context(
        self,
        id: str,
        title: str,
        unit: str,
        better: Literal["lower", "higher"],
        samples: Sequence[float],
        note: str = "",
        relative_to: tuple[str, float] | None = None,
    ) -> Context:
        """Record a context figure (best of ``samples``), optionally ``x / relative_to``."""
        value = best(samples, better)
        context = Context(id=id, title=title, unit=unit, value=value, samples=list(samples))
        context.note = note
        if relative_to is not None:
            context.relative_to = relative_to[0]
            context.relative = relative_to[1] / value if value else math.nan
        self.context.append(context)
        return context

    def sort(self, order: Sequence[str]) -> None:
        """Order the figures by the first prefix of ``order`` their id starts with."""

        def rank(id: str) -> int:
            for n, prefix in enumerate(order):
                if id.startswith(prefix):
                    return n
            return len(order)

        self.comparisons.sort(key=lambda c: rank(c.id))
        self.context.sort(key=lambda x: rank(x.id))

    @property
    def all_met(self) -> bool:
        return all(c.met is not False for c in self.comparisons)

    def print_table(self, file: Any = None) -> None:
        out = file or sys.stdout
        rows = [("figure", self.baseline_label, "trio_aggregates", "ratio", "paired", "target", "")]
        for c in self.comparisons:
            verdict = {True: "ok", False: "MISSED", None: ""}[c.met]
            rows.append(
                (
                    c.title,
                    fmt_value(c.bare, c.unit),
                    fmt_value(c.library, c.unit),
                    f"{c.ratio:.2f}x",
                    f"{c.paired_median:.2f}x",
                    c.target_text,
                    verdict,
                )
            )
        _print_rows(rows, out)
        if self.context:
            print(file=out)
            ctx_rows = [("context", "value", "library vs this", "")]
            for x in self.context:
                rel = "" if x.relative is None else f"{x.relative:.2f}x"
                ctx_rows.append((x.title, fmt_value(x.value, x.unit), rel, x.note))
            _print_rows(ctx_rows, out)
        missed = [c for c in self.comparisons if c.met is False]
        print(file=out)
        if missed:
            print(f"TARGETS MISSED ({len(missed)}):", file=out)
            for c in missed:
                print(f"  - {c.title}: {c.ratio:.2f}x, target {c.target_text}", file=out)
        else:
            print("All targets met.", file=out)
        print(
            "(ratio = best trio_aggregates / best bare, over the repetitions; paired = median"
            " of the per-repetition ratios, a check on noise;"
            f" {time.time() - self.started:.0f} s)",
            file=out,
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "quick": self.quick,
            "baseline_label": self.baseline_label,
            "parameters": self.parameters,
            "metadata": {
                **self.meta,
                "duration_s": time.time() - self.started,
                "loadavg_end": _loadavg(),
            },
            "comparisons": [c.as_json() for c in self.comparisons],
            "context": [x.as_json() for x in self.context],
            "all_targets_met": self.all_met,
        }

    def write_json(self, path: Path | None) -> None:
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_json(), indent=2, default=_json_default) + "\n")
        print(f"wrote {path}")


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def _print_rows(rows: Sequence[Sequence[str]], out: Any) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(), file=out
        )
        if n == 0:
            print("  ".join("-" * w for w in widths), file=out)


# -- metadata ---------------------------------------------------------------


def _loadavg() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def apply_reps(parameters: dict[str, Any], reps: int | None) -> dict[str, Any]:
    """Set every ``reps_*`` parameter to ``reps`` (the ``--reps N`` option), if given."""
    if reps is not None:
        for name in list(parameters):
            if name.startswith("reps_"):
                parameters[name] = reps
    return parameters


def package_version(module: str) -> str | None:
    """The installed version of ``module``'s distribution, or ``None``."""
    return _version(module)


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def metadata() -> dict[str, Any]:
    """Where and with what the figures were measured."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "trio": _version("trio"),
        "trio_aggregates": _version("trio-aggregates"),
        "git_commit": _git_commit(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": _loadavg(),
        "gc_threshold": list(gc.get_threshold()),
        "argv": sys.argv[1:],
    }


# -- markdown ---------------------------------------------------------------


def markdown(data: Mapping[str, Any]) -> str:
    """A JSON file written by :meth:`Report.write_json`, as Markdown tables."""
    baseline = data.get("baseline_label", "bare Trio")
    lines = [
        f"| figure | {baseline} | trio_aggregates | ratio | paired | target | |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in data["comparisons"]:
        target = "(info)" if c["target"] is None else f"{c['target_op']} {c['target']:g}x"
        verdict = {True: "ok", False: "**MISSED**", None: ""}[c["met"]]
        lines.append(
            f"| {c['title']} | {fmt_value(c['bare'], c['unit'])} "
            f"| {fmt_value(c['library'], c['unit'])} | {c['ratio']:.2f}x "
            f"| {c['paired_median_ratio']:.2f}x | {target} | {verdict} |"
        )
    if data["context"]:
        lines += ["", "| context | value | library vs this | |", "|---|---|---|---|"]
        for x in data["context"]:
            rel = "" if x["relative"] is None else f"{x['relative']:.2f}x"
            lines.append(
                f"| {x['title'].strip()} | {fmt_value(x['value'], x['unit'])} | {rel} "
                f"| {x['note']} |"
            )
    m = data["metadata"]
    load = m.get("loadavg_start") or [math.nan]
    lines += [
        "",
        f"{data['benchmark']}{' --quick' if data['quick'] else ''}, {m['date']}: "
        f"Python {m['python']}, Trio {m['trio']}, {m['cpu']} x{m['cpu_count']}, "
        f"load average {load[0]:.1f} at start, commit {str(m['git_commit'])[:10]}.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    # ``python benchmarks/_common.py results.json``: print it as Markdown.
    for name in sys.argv[1:]:
        print(markdown(json.loads(Path(name).read_text())))
