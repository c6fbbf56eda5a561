"""``boxloop search`` and ``boxloop search-train`` (registered by :mod:`backend.cli`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from backend.ingest import cli_project_id
from backend.settings import load_settings

__all__ = ["register"]


def _search(args: argparse.Namespace) -> int:
    """Search a project's tasks with a query file and print the top k (as the HTTP endpoint)."""
    from pydantic import ValidationError

    from backend.errors import ServiceError
    from backend.search_routes import SearchRequest
    from backend.search_service import SearchService
    from backend.service import BoxloopService

    try:
        query = json.loads(Path(args.query).read_text())
    except (OSError, ValueError) as exc:
        print(f"boxloop search: error: cannot read query {args.query}: {exc}", file=sys.stderr)
        return 2
    # the HTTP endpoint's request: the file's k and front apply, the flags override them
    flags = {"k": args.k} if args.k is not None else {}
    try:
        if not isinstance(query, dict):
            raise ValueError("the query must be a JSON object with an 'objects' list")
        request = SearchRequest.model_validate(
            {**query, **flags, "front": args.front or query.get("front", False)}
        )
    except (ValidationError, ValueError) as exc:
        print(f"boxloop search: error: invalid query {args.query}: {exc}", file=sys.stderr)
        return 2
    settings = load_settings(args.settings_file)
    svc = BoxloopService(settings)
    search = SearchService(
        settings,
        svc.store,
        image_source_for=svc.studio.image_source_of,
        push_order=svc.queue.push,
    )
    try:
        outcome = search.search(
            args.project, {"objects": request.objects}, k=request.k, front=request.front
        )
    except ServiceError as exc:
        print(f"boxloop search: error: {exc.message}", file=sys.stderr)
        return 2 if exc.status_code == 422 else 1
    finally:
        svc.close()
    print(json.dumps(outcome.to_json(), indent=2))
    return 0


def _search_train(args: argparse.Namespace) -> int:
    """Train the search model from a project's annotated tasks and a folder of sketches."""
    from backend.errors import ServiceError
    from backend.search_service import train_from_project
    from backend.service import BoxloopService

    settings = load_settings(args.settings_file)
    svc = BoxloopService(settings)
    try:
        path = train_from_project(
            settings,
            svc.store,
            args.project,
            svc.studio.image_source_of(args.project),
            Path(args.sketches),
            map_column=args.map_column,
            out=Path(args.out) if args.out else None,
        )
    except ServiceError as exc:
        print(f"boxloop search-train: error: {exc.message}", file=sys.stderr)
        return 1
    finally:
        svc.close()
    print(json.dumps({"model_dir": str(path)}))
    return 0


def register(sub: Any) -> None:
    """Add ``search`` and ``search-train`` to the ``boxloop`` subcommands."""
    search = sub.add_parser(
        "search",
        help="find a project's tasks by a sketch / box-layout query (docs/search.md)",
        description='Query JSON: {"objects": [{"box": {"x", "y", "width", "height"} '
        'in percent, "label": NAME or "strokes": [[[x, y], ...], ...]}]}',
    )
    search.add_argument("--project", type=cli_project_id, required=True)
    search.add_argument("--query", required=True, help="query JSON file")
    search.add_argument(
        "--k",
        type=int,
        help="results, 1 to 10000 (default: the file's k, else BOXLOOP_SEARCH_TOP_K)",
    )
    search.add_argument(
        "--front", action="store_true", help="move the results to the front of the queue"
    )
    search.set_defaults(func=_search)
    train = sub.add_parser(
        "search-train",
        help="train the search model on a project's annotated tasks and a sketch folder",
    )
    train.add_argument("--project", type=cli_project_id, required=True)
    train.add_argument(
        "--sketches", required=True, help="Quick, Draw! ndjson files named by the labels"
    )
    train.add_argument(
        "--map-column",
        help="column of the folder's category_map.tsv naming the labels (e.g. coco_class)",
    )
    train.add_argument("--out", help="model folder (default BOXLOOP_SEARCH_MODEL_DIR)")
    train.set_defaults(func=_search_train)
