"""How long a label config edit holds up ``/setup``: re-reading every stored annotation.

The store keeps each annotation's boxes as indices into the label list they were read with, so
a reordered, cut or extended list makes :func:`backend.ingest.save_label_config` read them all
again before it answers. This times that on a SQLite store of ``--annotations`` annotations
(``--boxes`` boxes each, labels reversed so every one reads differently), split into its
steps: loading the rows, parsing them, and writing them back, the write both as the store does
it (one statement, executed for every row) and as one ``UPDATE`` per row, the naive peer, in the
same process on a copy of the same database.

Usage::

    python -m benchmark.label_config_edit [--annotations 20000] [--out benchmark/results/label_config_edit.json]

Writes the JSON and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import update
from tqdm import tqdm

from backend.boxes import Boxes
from backend.ingest import parse_boxes, save_label_config
from backend.labelstudio.convert import LabelConfig
from backend.store import Store, annotations_table

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


def _write_per_row(store: Store, parsed: dict[int, tuple[int, Boxes | None, str | None]]) -> None:
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


def _copy_of(base: Path, name: str) -> Store:
    """A store on a fresh copy of the ``base`` database: each timing starts from the same rows."""
    copy = base.with_name(name)
    shutil.copy(base, copy)
    return Store(f"sqlite:///{copy}")


def run(n: int, boxes: int) -> dict[str, Any]:
    config = LabelConfig("label", "image", "image", LABELS)
    edited = LabelConfig("label", "image", "image", LABELS[::-1])
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base.db"
        _build(base, n, boxes, config)
        timings: dict[str, float] = {}

        # The steps, on one copy.
        store = _copy_of(base, "steps.db")
        start = time.perf_counter()
        annotations = store.list_annotations(1)
        timings["load_s"] = time.perf_counter() - start
        start = time.perf_counter()
        parsed = {}
        for a in annotations:
            b, error = parse_boxes(a.result, edited)
            parsed[a.annotation_id] = (a.revision, b, error)
        timings["parse_s"] = time.perf_counter() - start
        start = time.perf_counter()
        written = store.replace_parsed_boxes(1, parsed)
        timings["write_executemany_s"] = time.perf_counter() - start
        store.close()

        store = _copy_of(base, "naive.db")
        start = time.perf_counter()
        _write_per_row(store, parsed)
        timings["write_per_row_s"] = time.perf_counter() - start
        store.close()

        # The whole /setup step, as the backend runs it, on a fresh copy.
        store = _copy_of(base, "setup.db")
        start = time.perf_counter()
        save_label_config(store, 1, "<View/>", edited, None)
        timings["save_label_config_s"] = time.perf_counter() - start
        relabeled = sum(a.boxes is not None for a in store.list_annotations(1))
        store.close()
    return {
        "annotations": n,
        "boxes_per_annotation": boxes,
        "rows_written": written,
        "rows_relabeled": relabeled,
        **{k: round(v, 3) for k, v in timings.items()},
        "write_speedup_vs_per_row": round(
            timings["write_per_row_s"] / timings["write_executemany_s"], 2
        ),
    }


def _markdown(result: dict[str, Any]) -> str:
    rows = [
        ("load the rows (`list_annotations`)", result["load_s"]),
        ("parse them under the edited config", result["parse_s"]),
        ("write back: one statement, every row (the store)", result["write_executemany_s"]),
        ("write back: one `UPDATE` per row (naive peer)", result["write_per_row_s"]),
        ("**whole `save_label_config`** (as `/setup` runs it)", result["save_label_config_s"]),
    ]
    lines = [
        f"# Label config edit: {result['annotations']} annotations, "
        f"{result['boxes_per_annotation']} boxes each (SQLite)",
        "",
        "Command: `python -m benchmark.label_config_edit`",
        "",
        "| step | seconds |",
        "|---|---|",
        *(f"| {name} | {seconds:.2f} |" for name, seconds in rows),
        "",
        f"Write speed-up against one `UPDATE` per row: {result['write_speedup_vs_per_row']}×.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotations", type=int, default=20000)
    parser.add_argument("--boxes", type=int, default=5)
    parser.add_argument(
        "--out", type=Path, default=Path("benchmark/results/label_config_edit.json")
    )
    args = parser.parse_args(argv)
    result = run(args.annotations, args.boxes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(_markdown(result))
    print(_markdown(result))


if __name__ == "__main__":
    main()
