"""How one event's or output batch's `RunChange` merges into its run's row.

The merge is commutative, so events may arrive in any order and from several
ledgers at once: the state (and what goes with it: worker, status code,
reason, message) is the one of the latest lifecycle event, a tie going to the
later step; step times keep the latest attempt's; counters add up. An output
batch (rank 0) never sets the state, it only creates the row if needed.
"""

from __future__ import annotations

from mq_worker.ledger.migrations import SQLITE, Dialect
from mq_worker.ledger.records import RUN_COLUMNS

_WINS = ("(excluded.state_rank > 0 AND (runs.state_rank = 0 "
         "OR excluded.state_time > runs.state_time "
         "OR (excluded.state_time = runs.state_time AND excluded.state_rank >= runs.state_rank)))")
_FROM_WINNER = ("state", "state_time", "state_rank", "status_code", "reason", "message")
_LATEST_NOT_NULL = ("name", "pool", "queue", "flow_id", "flow_name", "deployment_id",
                    "deployment_name", "scheduled_start_time", "start_delay_seconds",
                    "duration_seconds")
_GREATEST = ("pending_at", "submitted_at", "ended_at")
_SUMS = ("event_count", "output_bytes", "output_lines")
_MAXIMUM = ("output_dropped_lines", "output_truncated")


def _greatest(dialect: Dialect, a: str, b: str) -> str:
    # SQLite's two-argument MAX is NULL when either is; PostgreSQL's GREATEST ignores NULLs.
    if dialect is SQLITE:
        return f"COALESCE(MAX({a}, {b}), {a}, {b})"
    return f"GREATEST({a}, {b})"


def run_upsert_sql(dialect: Dialect) -> str:
    """INSERT ... ON CONFLICT DO UPDATE of one run, with `?` placeholders in RUN_COLUMNS order."""
    sets: list[str] = []
    for column in RUN_COLUMNS:
        new, old = f"excluded.{column}", f"runs.{column}"
        if column == "id":
            continue
        if column in _FROM_WINNER:
            sets.append(f"{column} = CASE WHEN {_WINS} THEN {new} ELSE {old} END")
        elif column in ("worker", "infrastructure_pid"):
            sets.append(f"{column} = CASE WHEN {_WINS} AND {new} IS NOT NULL "
                        f"THEN {new} ELSE COALESCE({old}, {new}) END")
        elif column in _LATEST_NOT_NULL:
            sets.append(f"{column} = COALESCE({new}, {old})")
        elif column == "tags":
            sets.append(f"tags = CASE WHEN {new} <> '[]' THEN {new} ELSE {old} END")
        elif column == "created_at":
            least = "MIN" if dialect is SQLITE else "LEAST"
            sets.append(f"created_at = CASE WHEN {new} > 0 AND {old} > 0 "
                        f"THEN {least}({new}, {old}) ELSE {_greatest(dialect, new, old)} END")
        elif column in _GREATEST:
            sets.append(f"{column} = {_greatest(dialect, new, old)}")
        elif column in _SUMS:
            sets.append(f"{column} = {old} + {new}")
        elif column in _MAXIMUM:
            sets.append(f"{column} = {_greatest(dialect, new, old)}")
        else:
            raise AssertionError(f"no merge rule for runs.{column}")
    columns = ", ".join(RUN_COLUMNS)
    marks = ", ".join("?" * len(RUN_COLUMNS))
    return (f"INSERT INTO runs ({columns}) VALUES ({marks}) "
            f"ON CONFLICT (id) DO UPDATE SET {', '.join(sets)}")
