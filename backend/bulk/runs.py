"""The server's bulk runs: one per project at a time, each in a niced child process.

Why a child (:mod:`backend.bulk_worker`): a run fetches and decodes thousands of images and
keeps onnxruntime busy for minutes to hours; inside the server it would compete with
``/predict`` and webhooks for the GIL and the cores. Like a training job the child is niced,
dies with the server, gets the server's settings through a private file and writes its progress
to the store; its report comes back as the last line of its stdout. The CLI, which is a process
of its own, runs the work in process instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from backend.bulk.predict import BulkPredictor, BulkPredictRequest
from backend.errors import ServiceError
from backend.jobs import die_with_parent, write_private
from backend.settings import Settings, settings_to_json

__all__ = ["BulkRuns"]

log = logging.getLogger(__name__)


class BulkRuns:
    """Starts bulk runs and keeps each project's last run state for ``/status``."""

    def __init__(
        self,
        settings: Settings,
        predictor: BulkPredictor,
        worker_env: Callable[[int], dict[str, str]],
    ) -> None:
        self.settings = settings
        self.predictor = predictor
        self._worker_env = worker_env  # BOXLOOP_* values the child needs (e.g. a /setup token)
        self._state: dict[int, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    def start(
        self,
        project_id: int,
        request: BulkPredictRequest,
        *,
        wait: bool = False,
        progress: bool = False,
        in_process: bool = False,
    ) -> dict[str, Any]:
        """Start a run (refusals, 404 / 409, are raised at once); ``wait`` answers with its
        report; ``in_process`` runs it in this process instead of a child."""
        with self._lock:  # two requests at once: one runs, the other gets the 409
            before = self._state.get(project_id)
            if before is not None and before["state"] == "running":
                raise ServiceError(409, f"a bulk run of project {project_id} is already going")
            self._state[project_id] = {"state": "running"}
        try:
            self.predictor.check(project_id, request)  # may load the model: not under the lock
        except BaseException:
            with self._lock:
                if before is None:
                    self._state.pop(project_id, None)
                else:
                    self._state[project_id] = before
            raise
        if in_process:
            try:
                report = self.predictor.run(project_id, request, progress=progress)
            except ServiceError:
                self._state.pop(project_id, None)
                raise
            self._state[project_id] = report.to_dict()
            return dict(self._state[project_id])
        worker = threading.Thread(
            target=self._run_child,
            args=(project_id, request),
            name=f"boxloop-bulk-{project_id}",
            daemon=True,
        )
        worker.start()
        if wait:
            worker.join()
            state = self._state[project_id]
            if state["state"] == "failed" and "status_code" in state:
                raise ServiceError(int(state["status_code"]), str(state["error"]))
        return dict(self._state[project_id])

    def status(self, project_id: int) -> dict[str, Any]:
        """``{"job": this server's last run state, "runs": the store's last runs}``."""
        return {"job": self._state.get(project_id), "runs": self.predictor.status(project_id)}

    def close(self, timeout: float = 10.0) -> None:
        """Stop the runs' children: SIGTERM, which marks each run ``interrupted`` (a later run
        resumes where it stopped); waits up to ``timeout`` seconds for them to do so, since the
        server's exit kills them (``PR_SET_PDEATHSIG``) and a run killed so stays ``running``."""
        children = list(self._children.values())
        for child in children:
            child.terminate()
        deadline = time.monotonic() + timeout
        for child in children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(max(0.0, deadline - time.monotonic()))

    def _run_child(self, project_id: int, request: BulkPredictRequest) -> None:
        logs = self.settings.data_dir / "logs"
        log_path = logs / f"bulk-{project_id}-{time.strftime('%Y%m%d-%H%M%S')}.log"
        settings_path = log_path.with_suffix(".settings.json")
        command = [
            *(sys.executable, "-m", "backend.bulk_worker", "--project", str(project_id)),
            *("--request-json", request.model_dump_json(), "--settings-json", str(settings_path)),
        ]
        try:  # a failure here too must end the run's "running" state, or every later one is a 409
            logs.mkdir(parents=True, exist_ok=True)
            overrides = {
                key[len("BOXLOOP_") :].lower(): value
                for key, value in self._worker_env(project_id).items()
            }
            write_private(settings_path, settings_to_json(self.settings, **overrides))
            with open(log_path, "wb") as log_file:
                child = subprocess.Popen(
                    command, stdout=subprocess.PIPE, stderr=log_file, preexec_fn=die_with_parent
                )
                self._children[project_id] = child
                out, _ = child.communicate()
        except Exception as exc:
            log.exception("starting the bulk run of project %s failed", project_id)
            self._state[project_id] = {"state": "failed", "error": f"{type(exc).__name__}: {exc}"}
            return
        finally:
            # it holds secrets; with no log folder there is none, and the error is the run's
            with contextlib.suppress(OSError):
                settings_path.unlink(missing_ok=True)
            self._children.pop(project_id, None)
        lines = out.decode(errors="replace").strip().splitlines()
        try:
            result = json.loads(lines[-1]) if lines else None
        except ValueError:
            result = None
        if isinstance(result, dict) and child.returncode in (0, 1):
            self._state[project_id] = result
        else:
            tail = log_path.read_text(errors="replace")[-1500:] if log_path.is_file() else ""
            self._state[project_id] = {
                "state": "failed",
                "error": f"the bulk worker exited with code {child.returncode}: {tail}",
            }
