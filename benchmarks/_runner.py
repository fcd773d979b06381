"""The one way a benchmark script runs: its command line, the machine's description, the
measurement, its tables, and its result file (benchmarks/results/<name>.json)."""

from __future__ import annotations

import argparse
import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from benchmarks._report import banner, write_results

Result = TypeVar("Result")


def command_line(doc: str | None, *, quiet: float | None = None,
                 loop: bool = False) -> argparse.ArgumentParser:
    """A benchmark's argument parser, described by the first paragraph of its docstring.

    With `quiet`, it takes `--quiet SECONDS` (that default): how long to wait for other
    processes to calm down before measuring. With `loop`, `--loop` (the workers' event loop).
    """
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    if loop:
        parser.add_argument("--loop", default="auto", choices=["auto", "asyncio", "uvloop"])
    if quiet is not None:
        parser.add_argument("--quiet", type=float, default=quiet,
                            help="seconds to wait for other processes to calm down")
    return parser


def run_benchmark(
    name: str,
    args: argparse.Namespace,
    measure: Callable[[argparse.Namespace], Awaitable[Result] | Result],
    report: Callable[[Result], None],
    *,
    saved: Callable[[Result], dict[str, Any]] | None = None,
    results_name: str | None = None,
) -> Result:
    """Print the machine, measure (in an event loop of its own if `measure` is async), print
    the figures with `report`, then write them (or what `saved` keeps of them) to
    benchmarks/results/<results_name or name>.json."""
    banner(name)
    outcome = measure(args)
    result: Result = asyncio.run(_awaited(outcome)) if inspect.isawaitable(outcome) else outcome
    report(result)
    payload = saved(result) if saved is not None else result
    assert isinstance(payload, dict), "a benchmark's result is a dict, or `saved` makes one"
    write_results(results_name or name, payload)
    return result


async def _awaited(outcome: Awaitable[Result]) -> Result:
    return await outcome
