"""The training scheduler: its thread outlives a failed poll, servers sharing a database claim
jobs and leave each other's alone, and a stop or a kill loses no job and leaves no secret."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from backend.jobs import TrainingScheduler
from backend.settings import Settings
from backend.store import Store, utcnow
from tests.synthetic import LABEL_CONFIG


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


# ---------------------------------------------------------------- owners: several servers, one DB
def _project(store: Store, project_id: int = 7) -> None:
    store.upsert_project(
        project_id,
        label_config=LABEL_CONFIG,
        from_name="label",
        to_name="image",
        image_key="image",
        labels=["Square", "Disc"],
    )


def _scheduler(store: Store, tmp_path: Path, **settings: Any) -> TrainingScheduler:
    return TrainingScheduler(Settings(data_dir=tmp_path, **settings), store, lambda *_: None)


def test_a_queued_job_is_claimed_once_and_not_beside_a_running_one(store_url: str) -> None:
    """Two servers on one database both started the same queued job, and two jobs of one
    project could train at once."""
    store = Store(store_url)
    try:
        _project(store)
        first, second = store.create_job(7, "a"), store.create_job(7, "b")
        assert store.claim_job(first, "host-a:1:x")
        assert not store.claim_job(first, "host-b:1:y")  # already running
        assert not store.claim_job(second, "host-b:1:y")  # its project has a running job
        job = store.get_job(first)
        assert job is not None and job.owner == "host-a:1:x" and job.heartbeat_at is not None
        store.update_job(first, status="succeeded")
        assert store.claim_job(second, "host-b:1:y")
    finally:
        store.close()


def test_a_start_leaves_a_live_neighbours_job_and_requeues_dead_ones(
    store_url: str, tmp_path: Path
) -> None:
    """Each server's start marked every running job interrupted, its neighbour's too."""
    store = Store(store_url)
    try:
        for project_id in (1, 2, 3, 4):
            _project(store, project_id)
        host = socket.gethostname()
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        live_neighbour, dead_here, stale_elsewhere, legacy = (
            store.create_job(p, "x") for p in (1, 2, 3, 4)
        )
        store.claim_job(live_neighbour, "other-host:123:aa")
        store.claim_job(dead_here, f"{host}:{dead.pid}:bb")
        store.claim_job(stale_elsewhere, "other-host:456:cc")
        store.update_job(stale_elsewhere, heartbeat_at=utcnow() - timedelta(minutes=10))
        store.update_job(legacy, status="running", started_at=utcnow())  # before 0004: no owner

        requeued = _scheduler(store, tmp_path).recover()

        status = {
            j: store.get_job(j).status for j in (live_neighbour, dead_here, stale_elsewhere, legacy)
        }  # type: ignore[union-attr]
        assert status == {
            live_neighbour: "running",
            dead_here: "interrupted",
            stale_elsewhere: "interrupted",
            legacy: "interrupted",
        }
        assert sorted(store.get_job(j).project_id for j in requeued) == [2, 3, 4]  # type: ignore[union-attr]
    finally:
        store.close()


def test_leftover_settings_files_are_removed_and_fresh_ones_kept(tmp_path: Path) -> None:
    """A kill -9 of the server left a job's settings file (mode 0600, every token) in logs/."""
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        logs = tmp_path / "logs"
        logs.mkdir()
        old, bulk_old, fresh = (
            logs / name
            for name in ("job-3.settings.json", "bulk-1-x.settings.json", "job-4.settings.json")
        )
        for path in (old, bulk_old, fresh):
            path.write_text("{}")
        an_hour_ago = time.time() - 3600
        for path in (old, bulk_old):
            os.utime(path, (an_hour_ago, an_hour_ago))
        _scheduler(store, tmp_path).recover()
        assert not old.exists() and not bulk_old.exists()
        assert fresh.exists()  # a neighbour's child may be about to read it
    finally:
        store.close()


def test_a_clean_stop_queues_the_running_job_again(tmp_path: Path) -> None:
    """A clean stop (SIGTERM, Ctrl-C) marked the running job ``failed``, and the next start
    only requeued ``running`` ones: a job from ``/train`` was lost. A real child runs: Label
    Studio is a socket that never answers, so it stays in its first step until stopped. It
    also deletes its settings file (tokens) as soon as it has read it."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(16)
    settings = Settings(
        data_dir=tmp_path,
        label_studio_url=f"http://127.0.0.1:{hole.getsockname()[1]}",
        label_studio_token="secret",
    )
    store = Store(settings.resolved_database_url)  # the child opens the same database
    scheduler = TrainingScheduler(settings, store, lambda *_: None)
    try:
        _project(store)
        job = scheduler.request(7, "requested via /train")
        scheduler.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            current = store.get_job(job)
            if current is not None and current.message == "reconciling with Label Studio":
                break
            time.sleep(0.2)
        assert current is not None and current.message == "reconciling with Label Studio"
        assert not list((tmp_path / "logs").glob("*.settings.json"))
        scheduler.stop(timeout=30)
        assert store.get_job(job).status == "interrupted"  # type: ignore[union-attr]
        queued = store.list_jobs(7, statuses=["queued"])
        assert [j.reason for j in queued] == ["resume after restart"]
    finally:
        scheduler.stop()
        store.close()
        hole.close()


def test_a_job_whose_process_cannot_start_fails_instead_of_running_for_good(
    tmp_path: Path,
) -> None:
    """A claimed job is ``running`` under this server; one whose child never started (a full
    disk, a failed fork, an error gathering its environment) stayed so for good, and its
    project's later jobs could never be claimed."""
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")

    def no_environment(project_id: int) -> dict[str, str]:
        raise OSError(28, "No space left on device")

    scheduler = TrainingScheduler(
        Settings(data_dir=tmp_path), store, lambda *_: None, extra_env=no_environment
    )
    try:
        _project(store)
        job = scheduler.request(7, "requested via /train")
        scheduler.start()
        deadline = time.monotonic() + 30
        while store.get_job(job).status != "failed" and time.monotonic() < deadline:  # type: ignore[union-attr]
            time.sleep(0.05)
        failed = store.get_job(job)
        assert failed is not None and failed.status == "failed"
        assert "could not start the training process" in str(failed.error)
        assert "No space left on device" in str(failed.error)
    finally:
        scheduler.stop()
        store.close()
