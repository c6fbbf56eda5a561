"""One bulk pre-annotation run in a child process (``python -m backend.bulk_worker``).

Why a child: a run fetches and decodes thousands of images and keeps onnxruntime busy for
minutes to hours; inside the server it would compete with ``/predict`` and webhooks for the GIL
and the cores. Like a training job, the child is niced and dies with the server, reads the
server's settings from a private JSON file, writes its progress to the store (``/status``), and
prints its report as one JSON line on stdout when it is done. SIGTERM (what the server's
shutdown sends) and SIGHUP stop it as Ctrl-C does: its run is marked ``interrupted``, and a
later run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path
from types import FrameType

from backend.bulk.predict import BulkPredictRequest
from backend.errors import ServiceError
from backend.ingest import cli_project_id
from backend.service import BoxloopService
from backend.settings import settings_from_json


def _stop(signum: int, frame: FrameType | None) -> None:
    # Python's default for these ends the process at once: the run's row stayed "running"
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _stop)
    parser = argparse.ArgumentParser(description="Run one bulk pre-annotation (used internally).")
    parser.add_argument("--project", type=cli_project_id, required=True)
    parser.add_argument("--request-json", required=True, help="a BulkPredictRequest as JSON")
    parser.add_argument("--settings-json", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = settings_from_json(args.settings_json.read_text())
    args.settings_json.unlink(missing_ok=True)  # it holds tokens: gone once read
    request = BulkPredictRequest.model_validate_json(args.request_json)
    service = BoxloopService(settings)
    try:
        report = service.bulk.run(args.project, request, progress=False)
    except ServiceError as exc:
        print(json.dumps({"state": "failed", "error": exc.message, "status_code": exc.status_code}))
        return 1
    except KeyboardInterrupt as exc:  # the run (if it began) is marked ``interrupted``
        print(json.dumps({"state": "interrupted", "error": f"stopped by {str(exc) or 'Ctrl-C'}"}))
        return 1
    finally:
        service.close()
    print(json.dumps(report.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
