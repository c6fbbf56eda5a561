"""The ``boxloop`` command line: one entry point, subcommands.

Subcommands from other installed packages (the benchmark harness adds ``bench``)
are discovered through the ``boxloop.commands`` entry-point group, so the
backend never imports its harness.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import Any

from backend.errors import ServiceError
from backend.ingest import cli_project_id
from backend.settings import SettingsError, load_settings

# Busy-waiting OpenMP threads steal the cores from a training child running beside the server
# (measured: one 640 px /predict 473–1293 ms busy vs 288 ms passive under load); set before torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _positive_seconds(text: str) -> float:
    """An argparse ``type``: a finite number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return value


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from backend.app import create_app

    overrides: dict[str, Any] = {}
    if args.host:
        overrides["host"] = args.host
    if args.port:
        overrides["port"] = args.port
    settings = load_settings(args.settings_file, **overrides)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=5,
    )
    return 0


def _service(args: argparse.Namespace) -> Any:
    from backend.service import BoxloopService

    return BoxloopService(load_settings(args.settings_file))


def _status(args: argparse.Namespace) -> int:
    svc = _service(args)
    print(json.dumps(svc.status(), indent=2, default=str))
    return 0


def _stop_signals_as_ctrl_c() -> None:
    """SIGTERM and SIGHUP stop this command as Ctrl-C does, so the job or run it holds is
    marked as stopped; by Python's default they ended the process there and then, the row left
    ``running``."""

    def stopped(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stopped)


def _train(args: argparse.Namespace) -> int:
    """Train one version now, from this process, the way a server's job runs (claimed, in a
    child, with heartbeats: a server sharing the database leaves it alone); or follow the job a
    server claimed first. Exit 1 unless it succeeded, 130 on Ctrl-C (the job ends
    ``interrupted``)."""
    from tqdm import tqdm

    svc = _service(args)
    bars: list[Any] = []  # opened at the first report: a refusal prints its one line alone

    def show(job: Any) -> None:
        if not bars:
            bars.append(
                tqdm(total=100, unit="%", desc=f"project {args.project}", disable=args.quiet)
            )
        bars[0].n = round(100 * (job.progress or 0.0))
        bars[0].set_postfix_str(f"job {job.id} {job.status}: {job.message or ''}", refresh=False)
        bars[0].refresh()

    _stop_signals_as_ctrl_c()  # the job run here is marked so
    try:
        job = svc.train_now(args.project, here=show)
    except KeyboardInterrupt:
        job = None
    finally:
        for bar in bars:
            bar.close()
    if job is None:
        newest = svc.store.list_jobs(args.project, limit=1)
        now = f"; job {newest[0].id} is {newest[0].status}" if newest else ""
        print(f"boxloop train: stopped{now}", file=sys.stderr)
        return 130
    fields = ("id", "status", "model_version", "message", "error")
    print(json.dumps({("job" if f == "id" else f): getattr(job, f) for f in fields}))
    return 0 if job.status == "succeeded" else 1


#: ``boxloop order`` options and the :class:`OrderRequest` fields they set.
_ORDER_FIELDS = {
    "strategy": "strategy",
    "extractor": "extractor",
    "batch_size": "batch_size",
    "seed": "seed",
    "n_seed": "n_seed",
    "start": "start",
    "pca_dim": "pca_dim",
    "temporal_field": "temporal_field",
    "simnet_epochs": "simnet_epochs",
    "push": "push",
    "uncertainty": "uncertainty_scores",
}


def _order(args: argparse.Namespace) -> int:
    """Order a project's queue in the foreground and print the plan.

    The request is the one HTTP takes (``OrderRequest``): options left out take the settings
    (``BOXLOOP_ORDER_STRATEGY``, ``_BATCH_SIZE``, ``_SEED``, ``BOXLOOP_FEATURE_EXTRACTOR``).
    """
    from pydantic import ValidationError

    from backend.queueing import OrderRequest

    settings = load_settings(args.settings_file)
    given = {field: getattr(args, option) for option, field in _ORDER_FIELDS.items()}
    try:
        request = OrderRequest.for_settings(settings).model_validate(
            {k: v for k, v in given.items() if v is not None}
        )
    except ValidationError as exc:
        print(f"boxloop order: error: {_problems(exc)}", file=sys.stderr)
        return 2
    return _in_foreground(
        "order", settings, lambda svc: svc.order_project(args.project, request, wait=True)
    )


def _problems(exc: Any) -> str:
    """A pydantic ``ValidationError`` as one line: ``field: message; ...``."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors()
    )


def _in_foreground(command: str, settings: Any, call: Callable[[Any], dict[str, Any]]) -> int:
    """Run a queue job with a service of its own, print its state; 0 when it is done."""
    from backend.service import BoxloopService, ServiceError

    svc = BoxloopService(settings)
    try:
        state = call(svc)
    except ServiceError as exc:
        print(f"boxloop {command}: error: {exc.message}", file=sys.stderr)
        return 1
    finally:
        svc.close()
    print(json.dumps(state, indent=2, default=str))
    return 0 if state.get("state") == "done" else 1


def _request_job(
    command: str,
    args: argparse.Namespace,
    request_class: Any,
    fields: Sequence[str],
    call: Callable[[Any, Any], dict[str, Any]],
) -> int:
    """Build a typed request from the flags named ``fields`` (unset ones keep the request's
    defaults), then run ``call(service, request)`` in the foreground; exit 2 on bad flags."""
    from pydantic import ValidationError

    settings = load_settings(args.settings_file)
    given = {name: getattr(args, name) for name in fields}
    try:
        request = request_class.model_validate({k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        print(f"boxloop {command}: error: {_problems(exc)}", file=sys.stderr)
        return 2
    return _in_foreground(command, settings, lambda svc: call(svc, request))


def _box_queries(args: argparse.Namespace) -> int:
    """One box-level episode in the foreground (the request ``POST .../box-queries`` takes)."""
    from backend.box_queries import BoxQueryRequest

    return _request_job(
        "box-queries",
        args,
        BoxQueryRequest,
        ("measure", "k", "t_d", "noisy_weight", "seed", "push"),
        lambda svc, request: svc.run_box_queries(args.project, request, wait=True),
    )


def _predict(args: argparse.Namespace) -> int:
    """Bulk pre-annotation in the foreground (what ``POST .../bulk-predict`` runs)."""
    from backend.bulk.predict import BulkPredictRequest

    _stop_signals_as_ctrl_c()
    try:
        return _request_job(
            "predict",
            args,
            BulkPredictRequest,
            ("ray", "limit", "batch_size", "fetch_concurrency", "push_batch"),
            lambda svc, request: svc.run_bulk_predict(
                args.project, request, wait=True, progress=True, in_process=True
            ),
        )
    except KeyboardInterrupt:  # the run is marked interrupted
        print("boxloop predict: stopped; a new run resumes where this one stopped", file=sys.stderr)
        return 130


def _models_fetch(args: argparse.Namespace) -> int:
    """Download and verify the COCO YOLOX-Nano ONNX model into the data dir."""
    from backend.model_fetch import ModelFetchError, fetch_model

    settings = load_settings(args.settings_file)
    present = settings.resolved_onnx_model_path
    if present is not None and not present.is_file():  # only an explicit setting can be missing
        print(
            f"boxloop models fetch: error: BOXLOOP_ONNX_MODEL_PATH names {present}, which is no "
            "file; it takes precedence over a fetched model, so unset it (or point it at a "
            "model) to use one fetched here",
            file=sys.stderr,
        )
        return 1
    if args.if_missing and present is not None:
        print(f"COCO model present: {present}; nothing to fetch", file=sys.stderr)
        print(json.dumps({"installed": str(present), "skipped": True}))
        return 0
    try:
        info = fetch_model(
            settings,
            args.url,
            force=args.force,
            timeout_s=args.timeout,
            quiet=args.quiet,
            sha256=args.sha256,
        )
    except ModelFetchError as exc:
        print(f"boxloop models fetch: error: {exc}", file=sys.stderr)
        print(
            "nothing was installed; pre-annotation before the first training and training the "
            "default detector (yolox_nano) need this model (retry, pass --url URL_OR_FILE, or "
            "set BOXLOOP_ONNX_MODEL_PATH)",
            file=sys.stderr,
        )
        return 1
    print(json.dumps({"installed": info.path, "sha256": info.sha256, "bytes": info.bytes}))
    return 0


def _models_status(args: argparse.Namespace) -> int:
    """Which ONNX model pre-annotates before training, and where it comes from."""
    from backend.model_fetch import model_status

    status = model_status(load_settings(args.settings_file), verify=args.verify)
    print(json.dumps(status, indent=2, default=str))
    return 1 if status.get("verified") is False else 0


def _openapi(args: argparse.Namespace) -> int:
    from backend.app import create_app

    spec = create_app(load_settings(args.settings_file)).openapi()
    text = json.dumps(spec, indent=2)
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(text + "\n")
    else:
        print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="boxloop", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--settings", dest="settings_file", help="YAML settings file (BOXLOOP_* env vars win)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the Label Studio ML backend over HTTP")
    serve.add_argument("--host", help="bind address (default BOXLOOP_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default BOXLOOP_PORT or 9090)")
    serve.set_defaults(func=_serve)

    status = sub.add_parser("status", help="print projects, model versions, jobs and queues")
    status.set_defaults(func=_status)

    train = sub.add_parser("train", help="train a new model version for a project now")
    train.add_argument("--project", type=cli_project_id, required=True)
    train.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    train.set_defaults(func=_train)

    order = sub.add_parser(
        "order",
        help="order a project's queue and push it to Label Studio",
        description="Options left out take the settings, as POST /projects/{id}/order does.",
    )
    order.add_argument("--project", type=cli_project_id, required=True)
    order.add_argument(
        "--strategy",
        choices=["random", "similar", "dissimilar", "temporal"],
        help="default BOXLOOP_ORDER_STRATEGY (random)",
    )
    order.add_argument(
        "--extractor",
        help="imgnet_effnet_lite0, simnet, imgnet_resnet50, ... "
        "(default BOXLOOP_FEATURE_EXTRACTOR: imgnet_effnet_lite0)",
    )
    order.add_argument("--batch-size", type=int, help="default BOXLOOP_ORDER_BATCH_SIZE (10)")
    order.add_argument("--seed", type=int, help="default BOXLOOP_ORDER_SEED (0)")
    order.add_argument("--n-seed", type=int, help="random start images (1)")
    order.add_argument("--start", choices=["labeled", "random"], help="labeled (default) | random")
    order.add_argument("--pca-dim", type=int)
    order.add_argument("--temporal-field", help="task data field for the temporal order")
    order.add_argument("--simnet-epochs", type=int, help="(25)")
    order.add_argument(
        "--uncertainty",
        action="store_const",
        const=True,
        help="also set prediction scores from ranks (Uncertainty sampling)",
    )
    order.add_argument(
        "--no-push", dest="push", action="store_const", const=False, help="store the order only"
    )
    order.set_defaults(func=_order)

    boxes = sub.add_parser(
        "box-queries",
        help="box-level active learning: query the most informative predicted boxes",
        description="One episode, as POST /projects/{id}/box-queries runs it (docs/active-learning.md).",
    )
    boxes.add_argument("--project", type=cli_project_id, required=True)
    boxes.add_argument(
        "--measure", choices=["random", "uncertainty", "entropy", "margin", "coreset"]
    )
    boxes.add_argument("--k", type=int, help="boxes to query (20)")
    boxes.add_argument("--t-d", type=float, help="pool threshold (0.1)")
    boxes.add_argument("--noisy-weight", type=float, help="λ_d (0.5)")
    boxes.add_argument("--seed", type=int)
    boxes.add_argument(
        "--no-push", dest="push", action="store_const", const=False, help="store the episode only"
    )
    boxes.set_defaults(func=_box_queries)

    predict = sub.add_parser(
        "predict",
        help="pre-annotate every task without a prediction of the serving version",
        description="Bulk pre-annotation, resumable: lists the project's tasks in Label Studio, "
        "predicts those lacking the serving version's prediction and imports them in batches "
        "(docs/scale.md). Ctrl-C and run again to resume.",
    )
    predict.add_argument("--project", type=cli_project_id, required=True)
    predict.add_argument(
        "--ray",
        action="store_const",
        const=True,
        help="run on the Ray cluster at BOXLOOP_RAY_ADDRESS (default: when it is set)",
    )
    predict.add_argument(
        "--no-ray", dest="ray", action="store_const", const=False, help="run in this process"
    )
    predict.add_argument("--limit", type=int, help="predict at most this many tasks this run")
    predict.add_argument("--batch-size", type=int, help="images per inference batch (16)")
    predict.add_argument("--fetch-concurrency", type=int, help="images fetched at once (8)")
    predict.add_argument("--push-batch", type=int, help="predictions per import request (100)")
    predict.set_defaults(func=_predict)

    models = sub.add_parser(
        "models",
        help="fetch or show the COCO YOLOX model: it pre-annotates before training, and the "
        "default detector (yolox_nano) trains from it",
    )
    models_sub = models.add_subparsers(dest="models_command", required=True)
    fetch = models_sub.add_parser(
        "fetch",
        help="download and verify yolox_nano.onnx into <data_dir>/models/yolox_nano_coco/",
    )
    fetch.add_argument(
        "--url", help="model URL, file:// URL or local path (default BOXLOOP_MODEL_URL: official)"
    )
    fetch.add_argument(
        "--force", action="store_true", help="fetch even if a verified model is there"
    )
    fetch.add_argument(
        "--sha256",
        help="refuse a file with another sha256 (hex; default BOXLOOP_MODEL_SHA256, unset)",
    )
    fetch.add_argument(
        "--if-missing",
        action="store_true",
        help="do nothing if a model already serves (onnx_model_path set, or one fetched)",
    )
    fetch.add_argument(
        "--timeout", type=_positive_seconds, default=60.0, help="network timeout, seconds (> 0)"
    )
    fetch.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    fetch.set_defaults(func=_models_fetch)
    models_status = models_sub.add_parser(
        "status", aliases=["list"], help="print the model in use, its source and the fetched path"
    )
    models_status.add_argument(
        "--verify", action="store_true", help="also verify it (exit 1 if it fails)"
    )
    models_status.set_defaults(func=_models_status)

    openapi = sub.add_parser("openapi", help="write the HTTP API's OpenAPI spec")
    openapi.add_argument("--output", "-o", help="file to write (default: stdout)")
    openapi.set_defaults(func=_openapi)

    from backend.search_cli import register as register_search

    register_search(sub)

    for entry in entry_points(group="boxloop.commands"):
        register = entry.load()
        register(sub)
    return parser


def _one_line(exc: Exception) -> str:
    """What :func:`main` prints for an error it ends a command with."""
    from sqlalchemy.exc import OperationalError

    if isinstance(exc, ServiceError):
        return exc.message
    if isinstance(exc, OperationalError):  # unreachable, refused, wrong password, locked...
        first = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else "no detail"
        return f"cannot use the database: {type(exc.orig).__name__}: {first}"
    if isinstance(exc, OSError) and exc.strerror:
        where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        return f"{exc.strerror}: {where}" if where else exc.strerror
    return str(exc)


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Settings that cannot be used, a refusal of the service (an unknown
    project, no model yet), a data dir or output path that cannot be written and a database
    that cannot be reached end it with a one-line error and exit code 2, as argparse does for
    bad arguments, never with a traceback."""
    from sqlalchemy.exc import OperationalError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (SettingsError, ServiceError, OSError, OperationalError) as exc:
        command = " ".join(filter(None, ("boxloop", getattr(args, "command", None))))
        print(f"{command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
