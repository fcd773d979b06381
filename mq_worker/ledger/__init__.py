"""The run ledger: every run's story (its events, times, outcome and output) in a database.

    from mq_worker.ledger import LedgerStore

    with LedgerStore("sqlite:///ledger.db") as ledger:
        page = ledger.list_runs(state="crashed", limit=20)
        run = ledger.get_run(page.runs[0].id)       # with run.events in order
        lines = ledger.get_output(run.id)

The ledger service (`mq-worker ledger`) fills it from the event and output streams.
"""

from mq_worker.ledger.records import (
    STATES,
    TERMINAL_STATES,
    EventRecord,
    OutputLine,
    RunPage,
    RunRecord,
)
from mq_worker.ledger.store import AsyncLedgerStore, LedgerStore, default_db_url

__all__ = [
    "STATES",
    "TERMINAL_STATES",
    "AsyncLedgerStore",
    "EventRecord",
    "LedgerStore",
    "OutputLine",
    "RunPage",
    "RunRecord",
    "default_db_url",
]
