"""The issue's table in one command: mq_worker against Celery, pre-loaded runs, same run.

    .venv/bin/python -m benchmarks.side_by_side [--runs 3000] [--rounds 1]
        [--contenders mq-1x8,mq-2x4,mq-2x8,mq-processes-2,celery-events,celery]

For each contender: a vhost of its own, `runs` runs of /bin/true published and confirmed
first (mq_worker: the pool's queues declared first; Celery: its default classic queue),
then the worker processes started. The rate is from the first to the last completion
(mq_worker: `run.completed` events as a subscriber receives them; Celery: the task's own end
time, written by the task). CPU of each party is sampled from /proc every 50 ms and taken
over that same window: the worker (every process of its tree, without the CPU of the runs
it reaped: a process's own user+system time never includes its reaped children's) and the
broker (the Erlang VM). RSS is the largest sum over the worker's processes (runs excluded)
seen in the window: a process counts once it was there in the sample before, which leaves
out a run between its spawn and its exec (a vfork child shares its parent's memory, and
counting it doubled the worker's RSS). The broker's work for the contender's vhost alone is
also counted in Erlang reductions (`benchmarks._reductions`: other clients and a loaded
machine do not change it), from the pre-loaded queue to the last completion.

`--rounds N` repeats every contender N times, interleaved (A B C A B C ...), and reports
medians: on a shared machine, only figures measured side by side compare. Celery lives
in benchmarks/.venv-celery (created by benchmarks.compare_celery when missing). Workers
log at WARNING, like Celery's worker here; the contender `mq-1x8-info` shows what the
default level (INFO: one line per run) costs; `mq-1x8-window-N` (N of 3, 4, 8) and
`mq-2x8-window-N` (4, 8) prefetch windows other than the default half of the limit (a tree before
that default had a quarter); `mq-1x8-asyncio` asyncio's own loop (what
`pip install mq-worker` without the `speed` extra runs on), `mq-1x8-outcomes` and
`mq-2x8-outcomes` workers that publish only each run's outcome (`--run-events outcomes`),
`mq-2x4-window-2` two workers of limit 4 with a window of 2 (a tree before that default),
`mq-1x8-output` and `mq-2x8-output` runs that leave `stream_output` at the job template's
default (on: each run's stdout and stderr piped, logged and shipped); the others turn it off.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiormq
import psutil

from benchmarks._amqp import RUN_COMPLETED, EventWatch, Publisher, new_id
from benchmarks._broker import vhost
from benchmarks._machine import background_load, broker_process
from benchmarks._paths import PYTHON, RESULTS, ROOT
from benchmarks._probe import run_body
from benchmarks._reductions import Reading, reductions_by_module, vhost_reductions
from benchmarks._report import print_table
from benchmarks._runner import command_line, run_benchmark
from benchmarks.compare_celery import SIDE, TaskLog, celery_version, client, ensure_venv

TRUE = "/bin/true"
SAMPLE_SECONDS = 0.05
CONTENDERS = (
    "mq-1x8", "mq-2x4", "mq-2x8", "mq-processes-2", "celery-events", "celery", "mq-1x8-info",
    "mq-1x8-window-8", "mq-1x8-window-3", "mq-2x8-window-8", "mq-2x8-window-4", "mq-1x8-window-4",
    "mq-1x8-asyncio", "mq-1x8-outcomes", "mq-2x8-outcomes", "mq-2x4-window-2", "mq-1x8-output",
    "mq-2x8-output")


@dataclass(frozen=True)
class Sample:
    at: float  # time.time()
    worker_cpu: float
    broker_cpu: float
    main_cpu: float  # the started processes alone (without a guardian or pool processes)
    worker_rss: int
    main_waits: int = 0  # the started processes' voluntary context switches (they slept)


def _tree(roots: list[psutil.Process]) -> list[psutil.Process]:
    members: list[psutil.Process] = []
    for root in roots:
        with contextlib.suppress(psutil.Error):
            members += [root, *root.children(recursive=True)]
    return members


class Sampler:
    """Samples the worker processes' and the broker's CPU every SAMPLE_SECONDS in a thread."""

    def __init__(self, roots: list[psutil.Process]) -> None:
        self.roots = roots
        self.broker = broker_process()
        self.samples: list[Sample] = []
        self._before: set[psutil.Process] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> Sample:
        cpu = main = 0.0
        rss = waits = 0
        members = _tree(self.roots)
        for member in members:
            with contextlib.suppress(psutil.Error):
                if member.name() == "true":
                    continue
                times = member.cpu_times()
                cpu += times.user + times.system
                if member in self.roots:
                    main += times.user + times.system
                    waits += member.num_ctx_switches().voluntary
                if member in self.roots or member in self._before:
                    rss += member.memory_info().rss
        self._before = set(members)
        broker = 0.0
        if self.broker is not None:
            with contextlib.suppress(psutil.Error):
                times = self.broker.cpu_times()
                broker = times.user + times.system
        return Sample(time.time(), cpu, broker, main, rss, waits)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.sample())
            self._stop.wait(SAMPLE_SECONDS)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def window(self, first: float, last: float) -> tuple[float, float, float, int, int]:
        """(worker CPU s, broker CPU s, main processes' CPU s, largest RSS, main processes'
        sleeps) between the samples around first/last."""
        before = [s for s in self.samples if s.at <= first] or self.samples[:1]
        after = [s for s in self.samples if s.at >= last] or self.samples[-1:]
        start, end = before[-1], after[0]
        inside = [s.worker_rss for s in self.samples if start.at <= s.at <= end.at]
        return (end.worker_cpu - start.worker_cpu, end.broker_cpu - start.broker_cpu,
                end.main_cpu - start.main_cpu, max(inside or [end.worker_rss]),
                end.main_waits - start.main_waits)


def result_row(label: str, runs: int, completions: list[float], sampler: Sampler,
               processes: int) -> dict[str, Any]:
    completions.sort()
    first, last = completions[0], completions[-1]
    worker_cpu, broker_cpu, main_cpu, rss, waits = sampler.window(first, last)
    return {
        "contender": label, "runs": runs, "completed": len(completions),
        "rate": round((len(completions) - 1) / (last - first), 1),
        "worker_cpu_ms_per_run": round(worker_cpu * 1000 / runs, 3),
        "broker_cpu_ms_per_run": round(broker_cpu * 1000 / runs, 3),
        "main_cpu_ms_per_run": round(main_cpu * 1000 / runs, 3),
        "main_sleeps_per_run": round(waits / runs, 2),
        "worker_rss_mb": round(rss / 2**20, 1), "processes": processes,
    }


# -- mq_worker -------------------------------------------------------------------------------


@contextlib.contextmanager
def mq_processes(url: str, name: str, specs: list[list[str]],
                 tree: Path = ROOT) -> Iterator[list[psutil.Process]]:
    """`mq-worker start` once per argument list, with the mq_worker package of `tree`
    (another checkout, for an A/B of two versions); stopped with SIGTERM at exit."""
    RESULTS.joinpath("logs").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(tree)}
    popens = []
    for i, extra in enumerate(specs):
        with RESULTS.joinpath("logs", f"{name}-{i}.log").open("wb") as log:
            popens.append(subprocess.Popen(
                [PYTHON, "-m", "mq_worker", "start", "--url", url, "--name", f"{name}-{i}",
                 "--log-level", "WARNING", "--log-format", "json", *extra],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=tree, env=env))
    try:
        yield [psutil.Process(p.pid) for p in popens]
    finally:
        for p in popens:
            p.send_signal(signal.SIGTERM)
        for p in popens:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


async def declare(url: str) -> None:
    from mq_worker.topology import QueueOptions, declare_pool

    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel()
        await declare_pool(channel, "default", ["default"], QueueOptions())
    finally:
        await connection.close()


async def measure_mq(label: str, specs: list[list[str]], runs: int,
                     tree: Path = ROOT, stream_output: bool = False) -> dict[str, Any]:
    with vhost(label) as host:
        await declare(host.url)
        async with EventWatch(host.url, [RUN_COMPLETED]) as watch, \
                Publisher(host.url) as publisher:
            await publisher.publish_many(run_body(new_id(), TRUE, stream_output=stream_output)
                                         for _ in range(runs))
            completions: list[float] = []
            watch.on_event = lambda seen: completions.append(seen.received)
            loaded = vhost_reductions(host.name)
            with mq_processes(host.url, label.replace("@", "-"), specs, tree) as roots, \
                    Sampler(roots) as sampler:
                await watch.wait_count(RUN_COMPLETED, runs, 120 + runs / 10)
                await asyncio.sleep(2 * SAMPLE_SECONDS)  # a sample after the last completion
                done = vhost_reductions(host.name)  # before the workers' connections close
            watch.on_event = None
    processes = sum(int(s[s.index("--processes") + 1]) if "--processes" in s else 1
                    for s in specs)
    return _with_reductions(result_row(label, runs, completions, sampler, processes),
                            loaded, done)


# -- Celery ----------------------------------------------------------------------------------


def measure_celery(bin_dir: Path, label: str, events: bool, runs: int) -> dict[str, Any]:
    with vhost(label) as host:
        results = RESULTS / f".{label}.log"
        results.unlink(missing_ok=True)
        log = TaskLog(results)
        env = {**os.environ, "BENCH_BROKER_URL": host.url, "BENCH_RESULTS_FILE": str(results),
               "BENCH_QUEUE_TYPE": "classic"}
        client(bin_dir, host.url, "classic", "burst", str(runs), "0")
        loaded = vhost_reductions(host.name)
        argv = [str(bin_dir / "celery"), "-A", "tasks", "worker", "--pool", "prefork",
                "--concurrency", "8", "--loglevel", "WARNING", "--without-gossip",
                "--without-mingle", "--without-heartbeat", "-n", f"{label}@%h",
                *(["-E"] if events else [])]
        RESULTS.joinpath("logs").mkdir(parents=True, exist_ok=True)
        with RESULTS.joinpath("logs", f"{label}.log").open("wb") as out:
            worker = subprocess.Popen(argv, cwd=SIDE, env=env, stdout=out, stderr=out,
                                      stdin=subprocess.DEVNULL)
        try:
            with Sampler([psutil.Process(worker.pid)]) as sampler:
                # The client's first task (index -1) opens its connection: runs + 1 tasks.
                log.wait(range(-1, runs), 120 + runs / 10, worker)
                time.sleep(2 * SAMPLE_SECONDS)
                done = vhost_reductions(host.name)
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        results.unlink(missing_ok=True)
    ends = [log.tasks[i][2] for i in range(runs)]
    return _with_reductions(result_row(label, runs, ends, sampler, 9), loaded, done)


def _with_reductions(row: dict[str, Any], loaded: Reading | None,
                     done: Reading | None) -> dict[str, Any]:
    """`row` with the broker's reductions per run for the contender's vhost, in all and
    by the module its processes run."""
    by_module = reductions_by_module(loaded, done)
    row["broker_kreductions_per_run"] = None
    if by_module is not None:
        row["broker_kreductions_per_run"] = round(sum(by_module.values()) / row["runs"] / 1000, 3)
        row["broker_reductions_per_run_by_module"] = {
            module: round(count / row["runs"]) for module, count in sorted(by_module.items())}
    return row


# -- the table -------------------------------------------------------------------------------


def contender(name: str, runs: int, bin_dir: Path | None,
              trees: dict[str, Path]) -> Callable[[], dict[str, Any]]:
    """`name` is a contender of CONTENDERS; mq_worker ones may be `<contender>@<tree>`."""
    name, _, tree = name.partition("@")
    mq = {"mq-1x8": [["--limit", "8"]], "mq-2x4": [["--limit", "4"]] * 2,
          "mq-2x8": [["--limit", "8"]] * 2,
          "mq-processes-2": [["--limit", "16", "--processes", "2"]],
          "mq-1x8-info": [["--limit", "8", "--log-level", "INFO"]],
          "mq-1x8-window-8": [["--limit", "8", "--window", "8"]],
          "mq-1x8-window-3": [["--limit", "8", "--window", "3"]],
          "mq-2x8-window-8": [["--limit", "8", "--window", "8"]] * 2,
          "mq-2x8-window-4": [["--limit", "8", "--window", "4"]] * 2,
          "mq-1x8-window-4": [["--limit", "8", "--window", "4"]],
          "mq-1x8-asyncio": [["--limit", "8", "--loop", "asyncio"]],
          "mq-2x4-window-2": [["--limit", "4", "--window", "2"]] * 2,
          "mq-1x8-outcomes": [["--limit", "8", "--run-events", "outcomes"]],
          "mq-2x8-outcomes": [["--limit", "8", "--run-events", "outcomes"]] * 2,
          "mq-1x8-output": [["--limit", "8"]], "mq-2x8-output": [["--limit", "8"]] * 2}
    if name in mq:
        label = f"{name}@{tree}" if tree else name
        output = name.endswith("-output")
        return lambda: asyncio.run(measure_mq(label, mq[name], runs, trees.get(tree, ROOT),
                                              stream_output=output))
    assert bin_dir is not None
    return lambda: measure_celery(bin_dir, name, name == "celery-events", runs)


LABELS = {
    "mq-1x8": "mq_worker, 1 worker, limit 8",
    "mq-2x4": "mq_worker, 2 workers, limit 4 each",
    "mq-2x8": "mq_worker, 2 workers, limit 8 each",
    "mq-processes-2": "mq_worker, --processes 2 --limit 16",
    "mq-1x8-info": "mq_worker, 1 worker, limit 8, --log-level INFO",
    "mq-1x8-window-8": "mq_worker, 1 worker, limit 8, --window 8",
    "mq-1x8-window-3": "mq_worker, 1 worker, limit 8, --window 3",
    "mq-2x8-window-8": "mq_worker, 2 workers, limit 8 each, --window 8",
    "mq-2x8-window-4": "mq_worker, 2 workers, limit 8 each, --window 4",
    "mq-1x8-window-4": "mq_worker, 1 worker, limit 8, --window 4",
    "mq-1x8-asyncio": "mq_worker, 1 worker, limit 8, --loop asyncio",
    "mq-2x4-window-2": "mq_worker, 2 workers, limit 4 each, --window 2",
    "mq-1x8-outcomes": "mq_worker, 1 worker, limit 8, --run-events outcomes",
    "mq-2x8-outcomes": "mq_worker, 2 workers, limit 8 each, --run-events outcomes",
    "mq-1x8-output": "mq_worker, 1 worker, limit 8, runs' output streamed (the default)",
    "mq-2x8-output": "mq_worker, 2 workers, limit 8 each, runs' output streamed (the default)",
    "celery-events": "Celery prefork c=8, events on (-E)",
    "celery": "Celery prefork c=8, events off",
}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    trees = {n: Path(d).resolve() for n, _, d in (t.partition("=") for t in args.tree)}
    names = [n for n in args.contenders.split(",") if n]
    bin_dir = ensure_venv() if any(n.startswith("celery") for n in names) else None
    load_before = background_load()
    rows: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for _ in range(args.rounds):
        for name in names:
            row = contender(name, args.runs, bin_dir, trees)()
            rows[name].append(row)
            print(f"  {name}: {row['rate']} runs/s, worker {row['worker_cpu_ms_per_run']} ms "
                  f"(main processes {row['main_cpu_ms_per_run']} ms, "
                  f"{row['main_sleeps_per_run']} sleeps), "
                  f"broker {row['broker_cpu_ms_per_run']} ms "
                  f"({row.get('broker_kreductions_per_run')} k reductions) per run", flush=True)
    load_after = background_load()
    return {"celery": celery_version(bin_dir) if bin_dir else None, "runs": args.runs,
            "rounds": args.rounds, "other_load_cores": [load_before, load_after], "rows": rows}


def report(result: dict[str, Any]) -> None:
    rows: dict[str, list[dict[str, Any]]] = result["rows"]
    load_before, load_after = result["other_load_cores"]

    def median(name: str, key: str) -> float | None:
        values = [r[key] for r in rows[name] if r.get(key) is not None]
        return round(statistics.median(values), 3) if values else None

    def label(name: str) -> str:
        base, _, tree = name.partition("@")
        return LABELS[base] + (f" ({tree})" if tree else "")

    table = [[label(n), median(n, "rate"), median(n, "worker_cpu_ms_per_run"),
              median(n, "broker_cpu_ms_per_run"), median(n, "broker_kreductions_per_run"),
              f"{median(n, 'worker_rss_mb') or 0:.0f} MB ({rows[n][0]['processes']} processes)"]
             for n in rows]
    print_table(f"{result['runs']} runs of /bin/true pre-loaded, then the workers started; "
                f"medians of {result['rounds']} interleaved round(s); other load "
                f"{load_before:.2f} cores before, {load_after:.2f} after",
                ["contender", "runs/s", "worker CPU ms/run", "broker CPU ms/run",
                 "broker k reductions/run", "worker RSS"], table)


def main() -> None:
    parser = command_line(__doc__)
    parser.add_argument("--runs", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--tree", action="append", default=[], metavar="NAME=DIR",
                        help="another checkout of the repository, measured as contenders "
                             "named <contender>@NAME (e.g. mq-1x8@before)")
    run_benchmark("side_by_side", parser.parse_args(), measure, report)


if __name__ == "__main__":
    main()
