"""Statistics of the figures, the tables benchmarks print, and the result files they write."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from benchmarks._machine import describe_machine, machine_info
from benchmarks._paths import PYTHON, RESULTS, ROOT


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize_ms(seconds: Iterable[float]) -> dict[str, float]:
    """n, p50, p90, p99, max and mean of latencies given in seconds, in milliseconds."""
    values = sorted(s * 1000 for s in seconds)
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": round(percentile(values, 50), 3),
        "p90": round(percentile(values, 90), 3),
        "p99": round(percentile(values, 99), 3),
        "max": round(values[-1], 3),
        "mean": round(sum(values) / len(values), 3),
    }


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "-" if value is None else str(value)


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (readable as plain text too)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c)
              for i, c in enumerate(columns)]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    for raw, row in zip(rows, cells, strict=True):
        lines.append("| " + " | ".join(
            v.rjust(w) if isinstance(r, int | float) and not isinstance(r, bool) else v.ljust(w)
            for r, v, w in zip(raw, row, widths, strict=True)
        ) + " |")
    return "\n".join(lines)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    print(f"\n{title}\n")
    print(table(columns, rows))
    sys.stdout.flush()


def write_results(name: str, payload: dict[str, Any]) -> Path:
    """Write benchmarks/results/<name>.json with the machine's description."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {
        "benchmark": name,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(PYTHON).name, "-m", f"benchmarks.{name}", *sys.argv[1:]]),
        "machine": machine_info(),
        **payload,
    }
    path = RESULTS / f"{name}.json"
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")
    print(f"\nresults written to {path.relative_to(ROOT)}")
    return path


def banner(name: str) -> None:
    print(f"# {name}\n\nmachine: {describe_machine(machine_info())}")
    sys.stdout.flush()
