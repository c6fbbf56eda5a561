"""How long a label config edit holds up ``/setup``: re-reading every stored annotation.

The store keeps each annotation's boxes as indices into the label list they were read with, so
a reordered, cut or extended list makes :func:`backend.ingest.save_label_config` read them all
again before it answers. This times that on a SQLite store of ``--annotations`` annotations
(``--boxes`` boxes each, labels reversed so every one reads differently), split into its
steps: loading the rows, parsing them (and comparing with the stored boxes), and writing back
the ones that changed. Each step runs two ways in the same process, on copies of the same
database: as the backend does it now ("after": :meth:`Store.stored_readings`,
:func:`backend.ingest.read_anew`, :meth:`Store.replace_parsed_boxes`) and as it did before
("before", kept here as a peer: :meth:`Store.list_annotations` building every
:class:`Annotation` with its ``Boxes``, ``Boxes ==`` against each, and the write binding the
boxes through SQLAlchemy's JSON type); the write also as one ``UPDATE`` per row, the naive peer.
Both whole re-reads must leave the same rows behind (checked). Every figure is the median of
``--repeats`` runs, each on a fresh copy after a full garbage collection.

Usage::

    python -m benchmark.label_config_edit [--annotations 20000] [--boxes 5] [--repeats 3] [--out benchmark/results/label_config_edit.json]

Writes the JSON and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Text, bindparam, cast, select, update
from tqdm import tqdm

from backend.boxes import Boxes
from backend.ingest import parse_boxes, read_anew, reads_differently, save_label_config
from backend.labelstudio.convert import LabelConfig
from backend.store import Annotation, Store, annotations_table

T = TypeVar("T")

LABELS = ("car", "person", "dog", "cat", "bus")


def _region(i: int, j: int) -> dict[str, Any]:
    return {
        "from_name": "label",
        "to_name": "image",
        "type": "rectanglelabels",
        "original_width": 640,
        "original_height": 480,
        "value": {
            "x": 5.0 + j * 15,
            "y": 10.0 + (i % 7),
            "width": 10.0,
            "height": 20.0,
            "rectanglelabels": [LABELS[(i + j) % len(LABELS)]],
        },
    }


def _build(path: Path, n: int, boxes: int, config: LabelConfig) -> None:
    store = Store(f"sqlite:///{path}")
    save_label_config(store, 1, "<View/>", config, None)
    for i in tqdm(range(n), desc="annotations", unit="ann"):
        result = [_region(i, j) for j in range(boxes)]
        parsed, error = parse_boxes(result, config)
        store.upsert_annotation(1, i + 1, i + 1, result, parsed, parse_error=error)
    store.close()


Parsed = dict[int, tuple[int, Boxes | None, str | None]]


def _write_per_row(store: Store, parsed: Parsed) -> None:
    """The naive peer: one ``UPDATE`` statement per annotation, in one transaction."""
    table = annotations_table
    with store.engine.begin() as conn:
        for annotation_id, (revision, boxes, error) in parsed.items():
            conn.execute(
                update(table)
                .where(
                    (table.c.project_id == 1)
                    & (table.c.annotation_id == annotation_id)
                    & (table.c.revision == revision)
                )
                .values(boxes=None if boxes is None else boxes.to_dict(), parse_error=error)
            )


# ---------------------------------------------------------------- the re-read before, as a peer
def _read_anew_before(
    annotations: list[Annotation], config: LabelConfig
) -> tuple[Parsed, list[int]]:
    """``reparse_annotations``' loop before: every stored ``Boxes`` built, compared with ``==``."""
    changed: Parsed = {}
    usable_now: list[int] = []
    for annotation in annotations:
        boxes, parse_error = parse_boxes(annotation.result, config)
        if boxes != annotation.boxes or parse_error != annotation.parse_error:
            changed[annotation.annotation_id] = (annotation.revision, boxes, parse_error)
            if annotation.parse_error is not None and parse_error is None:
                usable_now.append(annotation.annotation_id)
    return changed, usable_now


def _write_before(
    store: Store,
    project_id: int,
    parsed: Mapping[int, tuple[int, Boxes | None, str | None]],
    renew: Collection[int] = (),
) -> int:
    """``Store.replace_parsed_boxes`` before: the rows hold ``to_dict()``'s lists, which
    SQLAlchemy's JSON type serializes when the statement runs."""
    table = annotations_table
    statement = (
        update(table)
        .where(
            (table.c.project_id == bindparam("b_project"))
            & (table.c.annotation_id == bindparam("b_annotation"))
            & (table.c.revision == bindparam("b_revision"))
        )
        .values(
            boxes=bindparam("b_boxes"),
            parse_error=bindparam("b_error"),
            revision=bindparam("b_new_revision"),
        )
    )
    rows = [
        {
            "b_project": project_id,
            "b_annotation": annotation_id,
            "b_revision": revision,
            "b_new_revision": revision,
            "b_boxes": None if boxes is None else boxes.to_dict(),
            "b_error": parse_error,  # (the store's NUL replacement: no NULs here)
        }
        for annotation_id, (revision, boxes, parse_error) in parsed.items()
    ]
    if not rows:
        return 0
    with store._revision_tx() as conn:
        if renew:
            first, wanted = store._next_revision(conn), set(renew)
            renewed = [row for row in rows if row["b_annotation"] in wanted]
            for offset, row in enumerate(renewed):
                row["b_new_revision"] = first + offset
        result = conn.execute(statement, rows)
    return result.rowcount if result.rowcount >= 0 else len(rows)


def _save_label_config_before(store: Store, config: LabelConfig) -> None:
    """``save_label_config`` before, on the peers above."""
    before = store.get_project(1)
    store.upsert_project(
        1,
        label_config="<View/>",
        from_name=config.from_name,
        to_name=config.to_name,
        image_key=config.image_key,
        labels=config.labels,
    )
    if reads_differently(before, config):
        changed, usable_now = _read_anew_before(store.list_annotations(1), config)
        if changed:
            _write_before(store, 1, changed, usable_now)


# ---------------------------------------------------------------- timing
def _copy_of(base: Path, name: str) -> Store:
    """A store on a fresh copy of the ``base`` database: each timing starts from the same rows."""
    copy = base.with_name(name)
    for leftover in (copy, copy.with_name(copy.name + "-wal"), copy.with_name(copy.name + "-shm")):
        leftover.unlink(missing_ok=True)
    shutil.copy(base, copy)
    return Store(f"sqlite:///{copy}")


def _timed(step: Callable[[], T]) -> tuple[T, float]:
    """``step()`` and its seconds, timed after a full garbage collection: each step starts from
    a clean heap, not the previous step's garbage."""
    gc.collect()
    start = time.perf_counter()
    value = step()
    return value, time.perf_counter() - start


def _rows(store: Store) -> list[tuple[Any, ...]]:
    table = annotations_table
    query = select(  # the boxes as the text stored: the same bytes, not only equal Boxes
        table.c.annotation_id, table.c.revision, cast(table.c.boxes, Text), table.c.parse_error
    )
    with store.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(query.order_by(table.c.annotation_id))]


def _round(base: Path, edited: LabelConfig) -> tuple[dict[str, float], int, int]:
    """One run of every timing; also ``(rows written, rows relabeled)``."""
    t: dict[str, float] = {}
    # the steps, before (the peer) and after (the backend), each on its own copy
    store = _copy_of(base, "steps_before.db")
    annotations, t["load_before_s"] = _timed(lambda: store.list_annotations(1))
    (changed, usable), t["parse_before_s"] = _timed(lambda: _read_anew_before(annotations, edited))
    annotations.clear()
    written_before, t["write_before_s"] = _timed(lambda: _write_before(store, 1, changed, usable))
    store.close()

    store = _copy_of(base, "steps_after.db")
    readings, t["load_after_s"] = _timed(lambda: store.stored_readings(1))
    (changed, usable), t["parse_after_s"] = _timed(lambda: read_anew(readings, edited))
    written, t["write_after_s"] = _timed(
        lambda: store.replace_parsed_boxes(1, changed, renew=usable)
    )
    store.close()
    if written != written_before:
        raise AssertionError(f"the write before stored {written_before} rows, after {written}")

    store = _copy_of(base, "naive.db")
    _, t["write_per_row_s"] = _timed(lambda: _write_per_row(store, changed))
    store.close()

    # the whole /setup step, before and after, each on a fresh copy
    before = _copy_of(base, "setup_before.db")
    _, t["save_label_config_before_s"] = _timed(lambda: _save_label_config_before(before, edited))
    after = _copy_of(base, "setup_after.db")
    _, t["save_label_config_after_s"] = _timed(
        lambda: save_label_config(after, 1, "<View/>", edited, None)
    )
    if _rows(before) != _rows(after):
        raise AssertionError("the re-read before and after left different rows")
    relabeled = sum(a.boxes is not None for a in after.list_annotations(1))
    before.close()
    after.close()
    return t, written, relabeled


def run(n: int, boxes: int, repeats: int = 3) -> dict[str, Any]:
    config = LabelConfig("label", "image", "image", LABELS)
    edited = LabelConfig("label", "image", "image", LABELS[::-1])
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base.db"
        _build(base, n, boxes, config)
        rounds = []
        for _ in tqdm(range(repeats), desc="runs", unit="run"):
            timings, written, relabeled = _round(base, edited)
            rounds.append(timings)
    median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    return {
        "annotations": n,
        "boxes_per_annotation": boxes,
        "repeats": repeats,
        "rows_written": written,
        "rows_relabeled": relabeled,
        **{k: round(v, 3) for k, v in median.items()},
        "speedup": round(
            median["save_label_config_before_s"] / median["save_label_config_after_s"], 2
        ),
        "write_speedup_vs_per_row": round(median["write_per_row_s"] / median["write_after_s"], 2),
    }


def _markdown(result: dict[str, Any]) -> str:
    rows = [
        ("load the rows", "`list_annotations`", "`stored_readings`", "load"),
        (
            "parse them under the edited config, compare with the stored boxes",
            "`Boxes ==`",
            "JSON decoded here, row by row",
            "parse",
        ),
        (
            "write back the changed rows: one statement, executed for each",
            "boxes bound as lists",
            "boxes bound as JSON text",
            "write",
        ),
        ("**whole `save_label_config`** (as `/setup` runs it)", "", "", "save_label_config"),
    ]
    lines = [
        f"# Label config edit: {result['annotations']} annotations, "
        f"{result['boxes_per_annotation']} boxes each (SQLite)",
        "",
        "Command: `python -m benchmark.label_config_edit`",
        "",
        f"Seconds, the median of {result['repeats']} runs; before and after in the same process,",
        "on copies of one database (`before`: the re-read as it was, kept in the benchmark as a peer).",
        "",
        "| step | before | after | before: how | after: how |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {result[f'{key}_before_s']:.2f} | {result[f'{key}_after_s']:.2f} "
            f"| {how_before} | {how_after} |"
            for name, how_before, how_after, key in rows
        ),
        f"| write back: one `UPDATE` per row (naive peer) | {result['write_per_row_s']:.2f} | | | |",
        "",
        f"Whole re-read: {result['speedup']}× faster. Write against one `UPDATE` per row: "
        f"{result['write_speedup_vs_per_row']}×. Rows written: {result['rows_written']}, "
        f"relabeled: {result['rows_relabeled']}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from benchmark.reports import write_result  # matplotlib: kept out of measured processes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotations", type=int, default=20000)
    parser.add_argument("--boxes", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="runs; each figure is the median")
    parser.add_argument(
        "--out", type=Path, default=Path("benchmark/results/label_config_edit.json")
    )
    args = parser.parse_args(argv)
    result = run(args.annotations, args.boxes, args.repeats)
    write_result(args.out, result, _markdown(result))


if __name__ == "__main__":
    main()
