"""The training scheduler's thread outlives a failed poll."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from backend.jobs import TrainingScheduler
from backend.settings import Settings
from backend.store import Store


def test_a_failed_poll_does_not_end_the_scheduler(tmp_path: Path) -> None:
    """One exception in the loop (a dropped PostgreSQL connection) ended the thread, and every
    later job stayed queued for good."""
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    polls: list[str] = []
    list_jobs = store.list_jobs

    def flaky(*args: Any, **kwargs: Any) -> Any:
        polls.append("poll")
        if len(polls) == 1:
            raise ConnectionError("server closed the connection unexpectedly")
        return list_jobs(*args, **kwargs)

    store.list_jobs = flaky  # type: ignore[method-assign]
    scheduler = TrainingScheduler(Settings(data_dir=tmp_path), store, lambda *_: None)
    scheduler.start()
    try:
        deadline = time.monotonic() + 20
        while len(polls) < 2 and time.monotonic() < deadline:
            scheduler._wake.set()
            time.sleep(0.05)
        assert len(polls) >= 2
        assert scheduler._thread is not None and scheduler._thread.is_alive()
    finally:
        scheduler.stop()
        store.close()
