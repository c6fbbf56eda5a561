"""Background training: a scheduler thread in the server, the work in a child process.

Training runs in its own process (``python -m backend.jobs --job ID``) so the
HTTP server never waits on it: the GIL, the CPU threads and the memory of
training stay out of the request path. The child is niced, dies with its parent
(``PR_SET_PDEATHSIG``), and reports progress through the store.

Several servers may share one database (PostgreSQL), so a server *claims* a queued job in one
conditional UPDATE and writes a heartbeat while it runs. A running job is abandoned when its
owner is a dead process on this host and in this PID namespace (a killed server, found at the
next start) or when its heartbeat is older than ``STALE_AFTER_S`` by the database's clock (a
server on another host died); it is marked ``interrupted`` and queued again, and should its
server still live, that server ends the job's child at its next heartbeat. A clean stop
(SIGTERM, Ctrl-C) does the same for the job it ends. So training always completes.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from backend.settings import Settings, load_settings, settings_from_json, settings_to_json
from backend.store import JOB_ACTIVE, Store, TrainingJob, utcnow

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1

#: Seconds between a running job's heartbeats, and the age at which another server takes a
#: heartbeat for a dead owner's. Generous: a busy 2-core server must not lose its own job.
HEARTBEAT_S = 10.0
STALE_AFTER_S = 120.0
#: How often the scheduler looks for abandoned jobs besides at start.
ORPHAN_SWEEP_S = 30.0
#: How often ``boxloop train`` reads the job it follows.
FOLLOW_S = 1.0


def die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass
    os.nice(10)


class TrainingScheduler:
    """Runs queued training jobs one at a time, oldest first, in child processes."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        on_success: Callable[[int, str], None],
        extra_env: Callable[[int], dict[str, str]] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.on_success = on_success
        self.extra_env = extra_env
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        #: who this scheduler is in the jobs table: host, process and a token for this start
        self.owner = f"{_host_id()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._last_sweep = 0.0
        #: a server queues the job its stop ends again; ``boxloop train`` stopped by Ctrl-C
        #: means the user's "not now"
        self.requeue_on_stop = True
        #: the job this scheduler runs now (claimed, its child started or about to be)
        self._current: int | None = None

    # ------------------------------------------------------------------ lifecycle
    def recover(self) -> list[int]:
        """Queue again the jobs a dead server left running; returns the queued job ids."""
        return self.requeue_abandoned()

    def requeue_abandoned(self) -> list[int]:
        """Mark running jobs whose server is gone ``interrupted`` and queue their projects
        again; returns the queued job ids. A neighbour's live job is left alone. Also removes
        the settings files (they hold tokens) a killed server's children never read."""
        _remove_stale_settings_files(self.settings.data_dir / "logs")
        requeued: list[int] = []
        now = self.store.database_now()  # the clock the heartbeats were written with
        for job in self.store.list_jobs(statuses=["running"], limit=1000):
            if job.owner == self.owner:
                if job.id == self._current:
                    continue  # ours, running; any other of ours lost its run (see :meth:`_run`)
            elif not _abandoned(job, self.owner, now):
                continue
            if self.store.update_owned_job(
                job.id,
                job.owner,
                status="interrupted",
                finished_at=utcnow(),
                message="server stopped while this job ran",
            ):
                requeued.append(self.request(job.project_id, "resume after restart"))
        return requeued

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="boxloop-training", daemon=True)
        self._thread.start()
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        with self._lock:
            if self._process is not None and self._process.poll() is None:
                self._process.terminate()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ requests
    def request(self, project_id: int, reason: str) -> int:
        """Queue a job for the project unless one is already queued; returns its id."""
        job_id, _ = self._queue(project_id, reason)
        return job_id

    def _queue(self, project_id: int, reason: str) -> tuple[int, bool]:
        queued = self.store.queue_job(project_id, reason)  # one transaction: servers race
        self._wake.set()
        return queued

    def train_here(
        self, project_id: int, reason: str, show: Callable[[TrainingJob], None]
    ) -> TrainingJob:
        """Train one version of the project from this process (``boxloop train``), as a
        server's scheduler does: the job claimed under this process, a child, heartbeats; returns
        the job at its end, shown to ``show`` as it goes.

        The command used to run the job unclaimed and in-process: a server's sweep took an
        ownerless running job for abandoned and trained the project beside it. When a server
        claims the queued job first, this follows that job, and runs it here should that server
        die; while another job of the project runs, it waits. Ctrl-C (or SIGTERM) ends a job
        run here ``interrupted`` and queues nothing. A job this queued and no one started yet
        is withdrawn (it used to stay queued, for a server to train later); one queued before,
        or started by a server, is left as it is."""
        self.requeue_on_stop = False
        job_id, queued_here = self._queue(project_id, reason)
        try:
            while not self.store.claim_job(job_id, self.owner):
                job = self._job(job_id)
                show(job)
                if job.status == "interrupted":  # its server died: queued again, to run here
                    job_id, queued_here = self._queue(project_id, reason)
                    continue
                if job.status not in JOB_ACTIVE:  # a server ran it to its end
                    return job
                time.sleep(FOLLOW_S)
                # the server running it, or the job it waits behind, may be gone
                self.requeue_abandoned()
        except KeyboardInterrupt:
            if queued_here:
                self.store.withdraw_queued_job(
                    job_id, "stopped from the command line before it ran"
                )
            raise
        done = threading.Event()  # not Thread.join: a Ctrl-C during a join left the thread
        # marked ended (CPython 3.11), and the process exited before the job was marked

        def run() -> None:
            try:
                self._run(job_id)
            finally:
                done.set()

        threading.Thread(target=run, name="boxloop-training").start()
        try:
            while not done.wait(FOLLOW_S):
                show(self._job(job_id))
        except KeyboardInterrupt:
            self.stop()
            done.wait(30)  # the run marks the job interrupted
            raise
        job = self._job(job_id)
        show(job)
        return job

    def _job(self, job_id: int) -> TrainingJob:
        job = self.store.get_job(job_id)
        if job is None:
            raise ValueError(f"training job {job_id} was deleted")
        return job

    def active_job(self, project_id: int) -> int | None:
        jobs = self.store.list_jobs(project_id, statuses=list(JOB_ACTIVE), limit=1)
        return jobs[0].id if jobs else None

    # ------------------------------------------------------------------ loop
    def _claim_next(self) -> int | None:
        """Claim the oldest queued job this server may start; None when there is none."""
        jobs = self.store.list_jobs(statuses=["queued"], limit=1000)
        for job_id in sorted(j.id for j in jobs):
            if self.store.claim_job(job_id, self.owner):
                return job_id
        return None

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=5.0)
            self._wake.clear()
            try:
                if time.monotonic() - self._last_sweep >= ORPHAN_SWEEP_S:
                    self._last_sweep = time.monotonic()
                    self.requeue_abandoned()
                while not self._stop.is_set():
                    job_id = self._claim_next()
                    if job_id is None:
                        break
                    self._run(job_id)
            except Exception:  # a dropped database connection, a failed fork: the thread lives
                # on (it died, and every later job stayed queued); the next poll tries again
                log.exception("training scheduler: a poll failed; trying again in 5 s")

    def _run(self, job_id: int) -> None:
        """Run claimed job ``job_id`` to its end. An error that leaves it unrecorded (the
        database gone at the child's end) marks it failed; failing that, the job stays running
        under this owner, and the sweep takes it over (it is not :attr:`_current`)."""
        self._current = job_id
        try:
            self._run_claimed(job_id)
        except Exception as exc:
            log.exception("training job %s: its end could not be recorded", job_id)
            try:
                self._fail(job_id, f"its end could not be recorded: {type(exc).__name__}: {exc}")
            except Exception:
                log.exception("training job %s: marking it failed failed too", job_id)
        finally:
            self._current = None

    def _fail(self, job_id: int, error: str) -> None:
        self.store.update_owned_job(
            job_id, self.owner, status="failed", finished_at=utcnow(), error=error
        )

    def _run_claimed(self, job_id: int) -> None:
        job = self.store.get_job(job_id)
        if job is None:
            return
        try:
            code, log_path = self._spawn_and_wait(job)
        except Exception as exc:  # no child: a full disk, a failed fork. The job is claimed
            # (running, ours), so left as it is it would stay running for good
            log.exception("training job %s could not start", job_id)
            self._fail(job_id, f"could not start the training process: {type(exc).__name__}: {exc}")
            return
        finally:
            with self._lock:
                self._process = None
        job = self.store.get_job(job_id)
        if job is None:
            return
        if job.status == "succeeded" and job.model_version:
            log.info("training job %s produced %s", job_id, job.model_version)
            try:
                self.on_success(job.project_id, job.model_version)
            except Exception:
                log.exception("swapping in %s failed", job.model_version)
        elif job.status in JOB_ACTIVE and self._stop.is_set():
            # a server's clean stop ended it: queue it again, as a restart after kill -9 would
            stopped = "server stopped" if self.requeue_on_stop else "stopped from the command line"
            if (
                self.store.update_owned_job(
                    job_id,
                    self.owner,
                    status="interrupted",
                    finished_at=utcnow(),
                    message=f"{stopped} while this job ran",
                )
                and self.requeue_on_stop
            ):
                self.request(job.project_id, "resume after restart")
            log.info("training job %s interrupted: %s", job_id, stopped)
        elif job.status in JOB_ACTIVE:
            tail = _tail(log_path)
            self.store.update_owned_job(  # not over a neighbour's takeover
                job_id,
                job.owner,
                status="failed",
                finished_at=utcnow(),
                error=f"worker exited with code {code}: {tail}",
            )
            log.error("training job %s failed (exit %s)", job_id, code)
        elif job.status == "interrupted":
            log.warning("training job %s was taken over by another server; its child ended", job_id)

    def _spawn_and_wait(self, job: TrainingJob) -> tuple[int, Path]:
        """Start the child for ``job`` and wait for it (writing heartbeats); returns its exit
        code and log path."""
        env = dict(os.environ)
        env["BOXLOOP_DATA_DIR"] = str(self.settings.data_dir)
        env["BOXLOOP_DATABASE_URL"] = self.settings.resolved_database_url
        # The child trains with the server's own Settings object (a settings file given to
        # `boxloop --settings` included), handed over as JSON: never re-read from the
        # environment, so training and serving agree on sizes and everything else.
        overrides: dict[str, str] = {"database_url": self.settings.resolved_database_url}
        if self.extra_env is not None:
            for key, value in self.extra_env(job.project_id).items():
                if key.startswith("BOXLOOP_"):
                    overrides[key[len("BOXLOOP_") :].lower()] = value
                else:
                    env[key] = value
        log_path = self.settings.data_dir / "logs" / f"job-{job.id}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        settings_path = log_path.with_suffix(".settings.json")
        log.info("training job %s for project %s starting (%s)", job.id, job.project_id, job.reason)
        command = [sys.executable, "-m", "backend.jobs", "--job", str(job.id)]
        try:
            write_private(settings_path, settings_to_json(self.settings, **overrides))
            with open(log_path, "wb") as log_file:
                with self._lock:
                    self._process = subprocess.Popen(
                        [*command, "--settings-json", str(settings_path)],
                        env=env,
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                        preexec_fn=die_with_parent,
                        # its own process group: a Ctrl-C in the terminal reaches this process
                        # only, which ends the child as a stop does (the child, killed by the
                        # same keypress first, was often taken for a failed job)
                        process_group=0,
                    )
                    if self._stop.is_set():  # a stop while it started found no child to end
                        self._process.terminate()
                return self._wait_beating(self._process, job.id), log_path
        finally:
            settings_path.unlink(missing_ok=True)  # it holds secrets

    def _wait_beating(self, process: subprocess.Popen[bytes], job_id: int) -> int:
        """Wait for the child, writing the job's heartbeat every ``HEARTBEAT_S``.

        A heartbeat refused means the job is not running under this server any more. When the
        child reported its end (succeeded, failed) it is about to exit; otherwise another server
        took the job over (it judged this one gone: a heartbeat gap, a skewed clock) and queued
        its project again, so the child is ended: it would train beside the new job and write
        its outcome over ``interrupted``."""
        while True:
            try:
                return process.wait(timeout=HEARTBEAT_S)
            except subprocess.TimeoutExpired:
                try:
                    if self.store.update_owned_job(
                        job_id, self.owner, heartbeat_at=self.store.database_now()
                    ):
                        continue
                    job = self.store.get_job(job_id)
                except Exception:  # a database hiccup must not orphan the running child
                    log.exception("training job %s: heartbeat failed", job_id)
                    continue
                if job is None or job.status not in ("succeeded", "failed"):
                    log.warning(
                        "training job %s is not ours any more (%s): ending its child",
                        job_id,
                        None if job is None else job.status,
                    )
                    process.terminate()


def _abandoned(job: TrainingJob, me: str, now: datetime) -> bool:
    """Whether running ``job``'s server is gone: a dead process on this host, this very process
    before a restart, a heartbeat older than ``STALE_AFTER_S`` at ``now`` (the database's
    clock, which the heartbeats were written with), or no owner at all (started before owners
    were recorded)."""
    if job.owner is None:
        return True
    host, _, rest = job.owner.partition(":")
    pid = rest.partition(":")[0]
    if host == _host_id() and pid.isdigit():
        if int(pid) == os.getpid() and job.owner != me:
            return True
        if not _alive(int(pid)):
            return True
    beat = job.heartbeat_at or job.started_at
    return beat is None or now - beat > timedelta(seconds=STALE_AFTER_S)


def _host_id() -> str:
    """This host as job owners name it: the hostname and the PID namespace. Pids are looked up
    only in one's own namespace, and two containers may share a hostname (host networking, one
    ``hostname:``) while each numbers its processes from 1: by the hostname alone each took the
    other's pid for a dead process, or for itself before a restart, and its live job over."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return socket.gethostname()
    return f"{socket.gethostname()}/{namespace}"


def _remove_stale_settings_files(logs: Path, min_age_s: float = 60.0) -> None:
    """Delete children's settings files older than ``min_age_s``: a child reads and deletes
    its file at once, so an old one is a killed server's, and it holds tokens."""
    if not logs.is_dir():
        return
    now = time.time()
    for path in logs.glob("*.settings.json"):
        try:
            if now - path.stat().st_mtime >= min_age_s:
                path.unlink()
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def write_private(path: Path, text: str) -> None:
    """Write ``text`` readable by this user only (it may hold tokens)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


#: Settings a job log names, so a log shows what the version was trained with.
_LOGGED_SETTINGS = (
    "detector",
    "detector_min_size",
    "detector_max_size",
    "train_epochs",
    "train_batch_size",
    "train_lr",
    "train_seed",
    "num_threads",
)


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _worker_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run one boxloop training job (used internally).")
    parser.add_argument("--job", type=int, required=True)
    parser.add_argument(
        "--settings-json",
        type=Path,
        help="the server's settings as JSON (default: read the environment / BOXLOOP_CONFIG)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.settings_json is not None:
        settings = settings_from_json(args.settings_json.read_text())
        # it holds tokens: gone once read, so a kill -9 of the server leaves nothing behind
        args.settings_json.unlink(missing_ok=True)
    else:
        settings = load_settings()
    log.info(
        "training job %s settings: %s",
        args.job,
        " ".join(f"{name}={getattr(settings, name, None)}" for name in _LOGGED_SETTINGS),
    )
    store = Store(settings.resolved_database_url)
    from backend.training_job import run_training_job

    try:
        run_training_job(settings, store, args.job)
    except Exception as exc:
        log.exception("training job %s failed", args.job)
        store.update_active_job(  # a job another server took over keeps ``interrupted``
            args.job, status="failed", finished_at=utcnow(), error=f"{type(exc).__name__}: {exc}"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main())
