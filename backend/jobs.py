"""Background training: a scheduler thread in the server, the work in a child process.

Training runs in its own process (``python -m backend.jobs --job ID``) so the
HTTP server never waits on it: the GIL, the CPU threads and the memory of
training stay out of the request path. The child is niced, dies with its parent
(``PR_SET_PDEATHSIG``), and reports progress through the store. A job left
``running`` by a killed server is marked ``interrupted`` at the next start and
queued again, so training always completes.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from backend.settings import Settings, load_settings, settings_from_json, settings_to_json
from backend.store import JOB_ACTIVE, Store, utcnow

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


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

    # ------------------------------------------------------------------ lifecycle
    def recover(self) -> list[int]:
        """Mark jobs a dead server left running as interrupted and queue them again."""
        requeued: list[int] = []
        for job in self.store.list_jobs(statuses=["running"], limit=1000):
            self.store.update_job(
                job.id,
                status="interrupted",
                finished_at=utcnow(),
                message="server stopped while this job ran",
            )
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
        with self._lock:
            queued = self.store.list_jobs(project_id, statuses=["queued"], limit=1)
            job_id = queued[0].id if queued else self.store.create_job(project_id, reason)
        self._wake.set()
        return job_id

    def active_job(self, project_id: int) -> int | None:
        jobs = self.store.list_jobs(project_id, statuses=list(JOB_ACTIVE), limit=1)
        return jobs[0].id if jobs else None

    # ------------------------------------------------------------------ loop
    def _next_job(self) -> int | None:
        jobs = self.store.list_jobs(statuses=["queued"], limit=1000)
        return min((j.id for j in jobs), default=None)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=5.0)
            self._wake.clear()
            try:
                while not self._stop.is_set():
                    job_id = self._next_job()
                    if job_id is None:
                        break
                    self._run(job_id)
            except Exception:  # a dropped database connection, a failed fork: the thread lives
                # on (it died, and every later job stayed queued); the next poll tries again
                log.exception("training scheduler: a poll failed; trying again in 5 s")

    def _run(self, job_id: int) -> None:
        job = self.store.get_job(job_id)
        if job is None:
            return
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
        log_path = self.settings.data_dir / "logs" / f"job-{job_id}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        settings_path = log_path.with_suffix(".settings.json")
        write_private(settings_path, settings_to_json(self.settings, **overrides))
        log.info("training job %s for project %s starting (%s)", job_id, job.project_id, job.reason)
        command = [sys.executable, "-m", "backend.jobs", "--job", str(job_id)]
        try:
            with open(log_path, "wb") as log_file:
                with self._lock:
                    self._process = subprocess.Popen(
                        [*command, "--settings-json", str(settings_path)],
                        env=env,
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                        preexec_fn=die_with_parent,
                    )
                code = self._process.wait()
        finally:
            settings_path.unlink(missing_ok=True)  # it holds secrets
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
        elif job.status in JOB_ACTIVE:
            tail = _tail(log_path)
            self.store.update_job(
                job_id,
                status="failed",
                finished_at=utcnow(),
                error=f"worker exited with code {code}: {tail}",
            )
            log.error("training job %s failed (exit %s)", job_id, code)


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
        store.update_job(
            args.job, status="failed", finished_at=utcnow(), error=f"{type(exc).__name__}: {exc}"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main())
