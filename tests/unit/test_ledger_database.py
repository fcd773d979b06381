"""Opening one SQLite ledger from several connections at once (a ledger and its dashboard)."""

from __future__ import annotations

import threading
from pathlib import Path

from mq_worker.ledger.database import connect


def test_connections_racing_to_open_a_new_sqlite_ledger_all_open(tmp_path: Path) -> None:
    failures: list[BaseException] = []
    for attempt in range(20):
        url = f"sqlite:///{tmp_path / f'race-{attempt}.db'}"
        start = threading.Barrier(4)

        def open_it(url: str = url, start: threading.Barrier = start) -> None:
            start.wait()
            try:
                connection, _ = connect(url)
                connection.close()
            except BaseException as exc:  # the test reports every failure at the end
                failures.append(exc)

        threads = [threading.Thread(target=open_it) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []
