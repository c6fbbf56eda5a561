"""The training scheduler: its thread outlives a failed poll, servers sharing a database claim
jobs and leave each other's alone, and a stop or a kill loses no job and leaves no secret."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Connection

from backend import jobs
from backend.jobs import TrainingScheduler, write_private
from backend.settings import Settings, settings_to_json
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
        host = jobs._host_id()  # the hostname and this PID namespace
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


def _slow_commit_store(url: str, release: threading.Event) -> Store:
    """A store whose transactions commit only once ``release`` is set (or after 10 s): a
    server on a busy host, whose writes its neighbour does not see yet."""

    class SlowCommit(Store):
        @contextmanager
        def _tx(self) -> Iterator[Connection]:
            with self.engine.begin() as conn:
                yield conn
                release.wait(10)

    return SlowCommit(url)


# ---------------------------------------------------------------- a live owner keeps its job
def test_two_claims_racing_for_one_project_start_one_job(store_url: str) -> None:
    """Two servers' ``request()`` can queue two jobs of one project. Their claims, at once on
    PostgreSQL (READ COMMITTED), each read a snapshot without the other's uncommitted
    ``running`` row and locked different rows: both started, and the project trained twice at
    once. Here server A's claim commits a moment late (a busy host)."""
    release = threading.Event()
    a, b = _slow_commit_store(store_url, release), Store(store_url)
    try:
        _project(b)
        first, second = b.create_job(7, "server A's /train"), b.create_job(7, "server B's")
        claimed: dict[str, bool] = {}
        claim_a = threading.Thread(
            target=lambda: claimed.__setitem__("a", a.claim_job(first, "host-a:1:aa"))
        )
        claim_a.start()
        time.sleep(0.5)  # A's UPDATE ran; its commit waits
        claim_b = threading.Thread(
            target=lambda: claimed.__setitem__("b", b.claim_job(second, "host-b:1:bb"))
        )
        claim_b.start()
        time.sleep(0.5)
        release.set()
        claim_a.join(15)
        claim_b.join(15)
        assert claimed == {"a": True, "b": False}
        assert [j.id for j in b.list_jobs(7, statuses=["running"])] == [first]
    finally:
        release.set()
        a.close()
        b.close()


def test_a_job_taken_over_by_another_server_stops_its_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A neighbour that judged this server gone (a heartbeat gap, a skewed clock) marked its
    job interrupted and queued the project again. The heartbeat's refusal was ignored: the
    child trained on beside the neighbour's and then wrote its outcome over ``interrupted``."""
    monkeypatch.setattr(jobs, "HEARTBEAT_S", 0.1)
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    scheduler = _scheduler(store, tmp_path)
    children: list[subprocess.Popen[bytes]] = []

    def wait_beating(job_id: int, seconds: float) -> int | None:
        child = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])
        children.append(child)
        codes: list[int] = []
        waiter = threading.Thread(
            target=lambda: codes.append(scheduler._wait_beating(child, job_id)), daemon=True
        )
        waiter.start()
        waiter.join(15)
        return codes[0] if codes else None

    try:
        _project(store)
        taken, finished = store.create_job(7, "x"), store.create_job(7, "y")
        assert store.claim_job(taken, scheduler.owner)
        store.update_owned_job(taken, scheduler.owner, status="interrupted")  # the neighbour
        code = wait_beating(taken, 60)
        assert code is not None and code != 0  # the child was ended, not waited out
        assert store.get_job(taken).status == "interrupted"  # type: ignore[union-attr]

        assert store.claim_job(finished, scheduler.owner)
        store.update_owned_job(finished, scheduler.owner, status="succeeded")  # the child's own
        assert wait_beating(finished, 1) == 0  # a child that reported its end is left to exit
    finally:
        for child in children:
            child.kill()
            child.wait()
        store.close()


def test_a_neighbour_whose_clock_runs_ahead_leaves_a_live_job_alone(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Heartbeats were written with the owner's clock and judged with the neighbour's: a host
    whose clock ran two minutes ahead took every live job of the others."""
    store = Store(store_url)
    try:
        _project(store)
        job = store.create_job(7, "x")
        assert store.claim_job(job, "other-host:123:aa")  # beats now, by its own clock
        ahead = utcnow() + timedelta(minutes=10)
        monkeypatch.setattr(jobs, "utcnow", lambda: ahead)  # this host's clock
        assert _scheduler(store, tmp_path).recover() == []
        assert store.get_job(job).status == "running"  # type: ignore[union-attr]
    finally:
        store.close()


def _unshare_pid() -> list[str]:
    command = ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc"]
    if shutil.which("unshare") is None:
        pytest.skip("unshare not found")
    if subprocess.run([*command, "true"], capture_output=True).returncode != 0:
        pytest.skip("no user and PID namespaces here")
    return command


def test_a_server_in_another_pid_namespace_with_this_hostname_is_not_taken_for_dead(
    tmp_path: Path,
) -> None:
    """Two containers sharing a hostname (host networking, one ``hostname:``), each its own PID
    namespace: each looked the other's pid up in its own namespace, found nothing (or itself,
    both being pid 1) and took the other's live job. (SQLite only: the user namespace cannot
    reach the test PostgreSQL's socket, and the rule is the same on both.)"""
    command = _unshare_pid()
    store_url = f"sqlite:///{tmp_path / 'state.db'}"
    store = Store(store_url)
    try:
        _project(store)
        job = store.create_job(7, "x")
        assert store.claim_job(job, _scheduler(store, tmp_path).owner)  # this live process
        neighbour = (
            "import sys; from pathlib import Path; from backend.jobs import TrainingScheduler; "
            "from backend.settings import Settings; from backend.store import Store; "
            "store = Store(sys.argv[1]); "
            "print(TrainingScheduler(Settings(data_dir=Path(sys.argv[2])), store, "
            "lambda *_: None).recover())"
        )
        out = subprocess.run(
            [*command, sys.executable, "-c", neighbour, store_url, str(tmp_path / "b")],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=Path(__file__).resolve().parents[2],
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "[]"
        assert store.get_job(job).status == "running"  # type: ignore[union-attr]
    finally:
        store.close()


def test_a_child_whose_job_was_taken_over_does_not_overwrite_it(tmp_path: Path) -> None:
    """A child that failed after a neighbour had marked its job interrupted (and queued the
    project again) wrote ``failed`` over it."""
    settings = Settings(data_dir=tmp_path)
    store = Store(settings.resolved_database_url)
    try:
        job = store.create_job(99, "x")  # no project 99: the child fails at once
        assert store.claim_job(job, "host-a:1:aa")
        store.update_owned_job(job, "host-a:1:aa", status="interrupted")  # the neighbour
        path = tmp_path / "job.settings.json"
        write_private(path, settings_to_json(settings))
        assert jobs._worker_main(["--job", str(job), "--settings-json", str(path)]) == 1
        assert store.get_job(job).status == "interrupted"  # type: ignore[union-attr]
    finally:
        store.close()


def test_two_servers_asking_to_train_one_project_at_once_queue_one_job(
    store_url: str, tmp_path: Path
) -> None:
    """``request()`` looked for a queued job, then queued one: two servers asking at once (a
    webhook on each, two restarts) both found none and queued a job each, and the project
    trained twice in a row. Server A's transactions commit a moment late here."""
    release = threading.Event()
    a, b = _slow_commit_store(store_url, release), Store(store_url)
    try:
        _project(b)
        asked: dict[str, int] = {}
        ask_a = threading.Thread(
            target=lambda: asked.__setitem__("a", _scheduler(a, tmp_path).request(7, "a"))
        )
        ask_a.start()
        time.sleep(0.5)
        ask_b = threading.Thread(
            target=lambda: asked.__setitem__("b", _scheduler(b, tmp_path).request(7, "b"))
        )
        ask_b.start()
        time.sleep(0.5)
        release.set()
        ask_a.join(15)
        ask_b.join(15)
        queued = b.list_jobs(7, statuses=["queued"])
        assert [j.id for j in queued] == [asked["a"]] == [asked["b"]]
    finally:
        release.set()
        a.close()
        b.close()


def test_a_child_started_after_a_takeover_does_not_bring_its_job_back(tmp_path: Path) -> None:
    """The child's first write set its job ``running`` again: a job a neighbour had taken over
    (``interrupted``, its project queued again) between the claim and the child's start came
    back to life, trained beside the new job and ended ``failed`` or ``succeeded`` over it."""
    settings = Settings(data_dir=tmp_path)
    store = Store(settings.resolved_database_url)
    try:
        _project(store)  # no annotations: a child that ran on would fail at its second step
        job = store.create_job(7, "x")
        assert store.claim_job(job, "host-a:1:aa")
        store.update_owned_job(job, "host-a:1:aa", status="interrupted")  # the neighbour
        path = tmp_path / "job.settings.json"
        write_private(path, settings_to_json(settings))
        assert jobs._worker_main(["--job", str(job), "--settings-json", str(path)]) == 1
        taken = store.get_job(job)
        assert taken is not None and (taken.status, taken.error) == ("interrupted", None)
    finally:
        store.close()


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_boxloop_train_claims_its_job_so_a_server_leaves_it_alone(
    tmp_path: Path, stop: str
) -> None:
    """``boxloop train`` ran its job unclaimed, in its own process: a server sharing the
    database took the ownerless running job for abandoned at its next sweep, queued the project
    again and trained it beside the command. Now the command claims the job and beats, and
    Ctrl-C (SIGINT to its process group, as a terminal sends it) or SIGTERM ends the job
    ``interrupted`` without queueing it again (SIGTERM left it running, for a server to train
    again). Label Studio is a socket that never answers, so the job stays in its first step."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(16)
    settings = Settings(data_dir=tmp_path)
    store = Store(settings.resolved_database_url)
    env = {
        **os.environ,
        "BOXLOOP_DATA_DIR": str(tmp_path),
        "BOXLOOP_LABEL_STUDIO_URL": f"http://127.0.0.1:{hole.getsockname()[1]}",
        "BOXLOOP_LABEL_STUDIO_TOKEN": "secret",
    }
    command = [sys.executable, "-m", "backend.cli", "train", "--project", "7", "--quiet"]
    cli = None
    try:
        _project(store)
        cli = subprocess.Popen(
            command,
            env=env,
            cwd=Path(__file__).resolve().parents[2],
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 120
        job = None
        while time.monotonic() < deadline and cli.poll() is None:
            listed = store.list_jobs(7)
            job = listed[0] if listed else None
            if job is not None and job.message == "reconciling with Label Studio":
                break
            time.sleep(0.2)
        assert job is not None and job.message == "reconciling with Label Studio", cli.poll()
        assert job.owner is not None and job.owner.split(":")[1] == str(cli.pid)

        server = _scheduler(store, tmp_path / "server")
        assert server.requeue_abandoned() == []  # the server's sweep leaves it alone
        assert store.get_job(job.id).status == "running"  # type: ignore[union-attr]

        if stop == "ctrl-c":
            os.killpg(cli.pid, signal.SIGINT)
        else:
            os.kill(cli.pid, signal.SIGTERM)
        _, err = cli.communicate(timeout=60)
        assert cli.returncode == 130, err
        stopped = store.get_job(job.id)
        assert stopped is not None and stopped.status == "interrupted", err
        assert stopped.message == "stopped from the command line while this job ran"
        assert store.list_jobs(7, statuses=["queued"]) == []
    finally:
        if cli is not None and cli.poll() is None:
            os.killpg(cli.pid, signal.SIGKILL)
            cli.wait()
        store.close()
        hole.close()


def test_boxloop_train_runs_the_job_itself_when_the_server_that_claimed_it_dies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server claimed the command's job first, and the command followed it; when that server
    died the command followed a dead job for good. Now its sweep takes the job over and the
    command runs the project's job itself (here the child fails at once: no annotations)."""
    monkeypatch.setattr(jobs, "FOLLOW_S", 0.05)
    settings = Settings(data_dir=tmp_path)
    store = Store(settings.resolved_database_url)
    scheduler = TrainingScheduler(settings, store, lambda *_: None)
    dead = f"{jobs._host_id()}:99999999:dead"  # a server that claimed it, then was killed
    claim = store.claim_job
    first: list[int] = []

    def server_first(job_id: int, owner: str) -> bool:
        if not first:
            first.append(job_id)
            assert claim(job_id, dead)
            return False
        return claim(job_id, owner)

    store.claim_job = server_first  # type: ignore[method-assign]
    try:
        _project(store)
        shown: list[tuple[int, str]] = []
        job = scheduler.train_here(
            7, "requested via boxloop train", lambda j: shown.append((j.id, j.status))
        )
        assert first and (first[0], "running") in shown  # it followed the server's run
        assert store.get_job(first[0]).status == "interrupted"  # type: ignore[union-attr]
        assert job.id != first[0] and job.owner == scheduler.owner
        assert job.status == "failed" and "no usable annotations" in str(job.error)
    finally:
        store.close()


def test_a_stop_while_the_child_starts_ends_it(tmp_path: Path) -> None:
    """A stop found no child to end while one was being started (Ctrl-C just after
    ``boxloop train`` claimed its job): the child trained on, and the command with it."""
    settings = Settings(data_dir=tmp_path)
    store = Store(settings.resolved_database_url)

    def stop_meanwhile(project_id: int) -> dict[str, str]:
        scheduler.stop()  # arrives while the child's environment is gathered
        return {}

    scheduler = TrainingScheduler(settings, store, lambda *_: None, extra_env=stop_meanwhile)
    try:
        _project(store)
        job = scheduler.request(7, "x")
        assert store.claim_job(job, scheduler.owner)
        started = time.monotonic()
        scheduler._run(job)
        assert time.monotonic() - started < 10  # ended, not run to its failure
        stopped = store.get_job(job)
        assert stopped is not None and stopped.status == "interrupted", stopped
        assert [j.reason for j in store.list_jobs(7, statuses=["queued"])] == [
            "resume after restart"
        ]
    finally:
        store.close()


def test_a_job_whose_run_lost_track_of_it_is_failed_or_taken_over(tmp_path: Path) -> None:
    """An error after the child (the database gone as it ended) left the job running under its
    own live server, whose sweep skips its own jobs: it stayed running for good. Now the run
    marks it failed, and the sweep takes over a job of its own that it is not running."""
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    scheduler = _scheduler(store, tmp_path)
    try:
        _project(store)
        lost = scheduler.request(7, "x")
        assert store.claim_job(lost, scheduler.owner)

        def database_gone(job_id: int) -> None:
            raise ConnectionError("server closed the connection unexpectedly")

        scheduler._run_claimed = database_gone  # type: ignore[method-assign]
        scheduler._run(lost)
        failed = store.get_job(lost)
        assert failed is not None and failed.status == "failed"
        assert "server closed the connection" in str(failed.error)

        stranded = scheduler.request(7, "y")
        assert store.claim_job(stranded, scheduler.owner)
        scheduler._current = stranded
        assert scheduler.requeue_abandoned() == []  # ours, and running
        scheduler._current = None
        assert len(scheduler.requeue_abandoned()) == 1  # ours, but nobody runs it
        assert store.get_job(stranded).status == "interrupted"  # type: ignore[union-attr]
    finally:
        store.close()


@pytest.mark.parametrize("queued_before", [False, True])
def test_ctrl_c_while_boxloop_train_waits_withdraws_only_the_job_it_queued(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, queued_before: bool
) -> None:
    """Ctrl-C while ``boxloop train`` waited behind a running job left the job it had queued
    for a server to train later, against the user's "not now". A job someone else queued
    before (a webhook's) stays queued."""
    monkeypatch.setattr(jobs, "FOLLOW_S", 0.01)
    settings = Settings(data_dir=tmp_path)
    store = Store(settings.resolved_database_url)
    scheduler = TrainingScheduler(settings, store, lambda *_: None)
    try:
        _project(store)
        running = store.create_job(7, "a server's")
        assert store.claim_job(running, f"{socket.gethostname()}-elsewhere:1:live")
        before = scheduler.request(7, "4 new annotations") if queued_before else None
        waits: list[int] = []

        def ctrl_c(job: Any) -> None:
            waits.append(job.id)
            if len(waits) == 3:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            scheduler.train_here(7, "requested via boxloop train", ctrl_c)
        waited = store.get_job(waits[-1])
        assert waited is not None and waited.id != running
        if queued_before:
            assert waited.id == before and waited.status == "queued"
        else:
            assert waited.status == "interrupted" and "command line" in str(waited.message)
        assert store.get_job(running).status == "running"  # type: ignore[union-attr]
    finally:
        store.close()
