"""Markdown tables like the paper's Tables 1–2, and PNG curves, from the per-run JSON files.

Everything here is recomputed from what a run stored (per-batch predictions and
ground truth, the oracle's corrections for every τ × score threshold × treatment
of ignored objects, and the mAP curve), so a report can be regenerated with
other τ, score thresholds or T values without re-running anything: corrections
a run lacks are counted when the report is written
(:func:`benchmark.corrections.refresh_corrections`).

Score thresholds: the W_T / W_B tables hold one column per score threshold of
the config, plus a "gate's threshold" column when runs record the threshold the
product's promotion gate chose for each batch (``batch["gate_threshold"]``).
Ignored ground truth (VOC difficult, KITTI DontCare, COCO crowds): the main
tables use ``config.ignored_objects``, and Table 1* shows the other treatment;
every caption says which is used.

Table entries are mean ± sd (sample sd, ``ddof=1``) over the seeds, with the
seeds listed. Following the method notes, an entry is **bold** when it is the
column's best in its dataset *or* no different from it given the spread
(``|Δmean| ≤ max(sd)``), so a table never crowns a winner inside the noise.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on CI or servers
import matplotlib.pyplot as plt
import numpy as np

from backend.scoring import (
    BatchTally,
    Convention,
    Correction,
    CostModel,
    Workload,
    compute_workload,
    cumulative_seconds,
)
from benchmark.config import IGNORED_OBJECTS, DatasetConfig, ExperimentConfig, IgnoredObjects
from benchmark.corrections import GATE, Score, batch_boxes, correction_key, refresh_corrections

MANUAL = "Full manual"
#: The layout of the run files :mod:`benchmark.runner` writes. A grid reuses only runs of this
#: one; a report also reads the older ones (1: the Faster R-CNN loop's, as in stored results).
SCHEMA = 2
READABLE_SCHEMAS = range(1, SCHEMA + 1)
#: A run's key from its dataset and the groups of identical images it recorded:
#: :func:`benchmark.runner.run_key` with the grid's config bound (passed in: the runner
#: imports this module).
RunKey = Callable[[DatasetConfig, Sequence[Sequence[str]]], str]


class StaleRunWarning(UserWarning):
    """Run files under a grid's folder that belong to another grid and are left out."""


@dataclass(frozen=True)
class Stat:
    """Mean and sample sd of one table cell over seeds."""

    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        finite = [v for v in self.values if not math.isnan(v)]
        return float(np.mean(finite)) if finite else math.nan

    @property
    def sd(self) -> float:
        finite = [v for v in self.values if not math.isnan(v)]
        return float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0

    def format(self, digits: int = 2) -> str:
        if math.isnan(self.mean):
            return "–"
        if len(self.values) < 2:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.sd:.{digits}f}"


# ---------------------------------------------------------------------------------- loading
def write_json(path: Path, data: dict[str, Any]) -> None:
    """A run's JSON, written whole or not at all (a temporary file moved over the old one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def write_result(out: Path, results: dict[str, Any], table: str) -> None:
    """A measurement's JSON at ``out``, its Markdown table beside it (``.md``), and the table
    printed: what every ``python -m benchmark.<measurement>`` script leaves."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(table)
    print(table)


def batch_tallies(
    run: dict[str, Any], iou: float, score: Score, ignored: IgnoredObjects = "excluded"
) -> list[BatchTally]:
    """The run's batches with their corrections at ``(iou, score, ignored)``.

    Raises ``KeyError`` when a corrected batch lacks that count (for :data:`GATE`:
    the batch recorded no gate threshold).
    """
    key = correction_key(iou, score, ignored)
    tallies = []
    for batch in run["batches"]:
        boxes = batch_boxes(batch, ignored)
        if batch["manual"]:
            tallies.append(BatchTally(batch["images"], boxes))
            continue
        if key not in batch["corrections"]:
            raise KeyError(f"run {run['run_id']} has no corrections for {key}")
        tallies.append(
            BatchTally(batch["images"], boxes, Correction.from_dict(batch["corrections"][key]))
        )
    return tallies


def manual_tallies(run: dict[str, Any], ignored: IgnoredObjects = "excluded") -> list[BatchTally]:
    """The same batches, all drawn by hand (the full-manual baseline)."""
    return [BatchTally(b["images"], batch_boxes(b, ignored)) for b in run["batches"]]


def cost_model(config: ExperimentConfig, seconds_per_box: float) -> CostModel:
    return CostModel(seconds_per_box, config.removal_fraction, config.adjustment_fraction)


def run_workload(
    run: dict[str, Any],
    config: ExperimentConfig,
    iou: float,
    score: Score,
    convention: Convention,
    t: float,
    ignored: IgnoredObjects | None = None,
) -> Workload:
    """Totals of one run; ``ignored`` defaults to ``config.ignored_objects``."""
    mode = config.ignored_objects if ignored is None else ignored
    return compute_workload(batch_tallies(run, iou, score, mode), cost_model(config, t), convention)


def _or_nan(cell: Callable[[dict[str, Any]], float]) -> Callable[[dict[str, Any]], float]:
    """``cell`` with a missing count (a run without gate thresholds) read as ``nan``."""

    def wrapped(run: dict[str, Any]) -> float:
        try:
            return cell(run)
        except KeyError:
            return math.nan

    return wrapped


def records_gate(runs: Iterable[dict[str, Any]]) -> bool:
    """Whether any corrected batch of any run recorded the gate's chosen threshold."""
    return any(
        b.get("gate_threshold") is not None for r in runs for b in r["batches"] if not b["manual"]
    )


def score_columns(config: ExperimentConfig, runs: Iterable[dict[str, Any]]) -> list[Score]:
    """The config's score thresholds, then :data:`GATE` if any run records gate thresholds."""
    scores: list[Score] = list(config.score_thresholds)
    return [*scores, GATE] if records_gate(runs) else scores


def score_label(score: Score) -> str:
    return "gate's threshold" if score == GATE else f"score ≥ {float(score):g}"


def ignored_caption(ignored: IgnoredObjects) -> str:
    if ignored == "counted":
        return (
            "Difficult / crowd objects **counted** (the paper's object counts): each is a box to "
            "draw, and a prediction must match it like any box. KITTI DontCare regions stay "
            "excluded, as from the paper's KITTI count."
        )
    return (
        "Difficult / DontCare / crowd objects **excluded** (each dataset's own protocol): never "
        "drawn, not in W_manual, and a prediction on one costs nothing."
    )


# ---------------------------------------------------------------------------------- grouping
def group_runs(runs: Iterable[dict[str, Any]]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """``{dataset name: {approach label: [runs sorted by seed]}}`` in first-seen order."""
    grouped: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        grouped[run["dataset"]["name"]][run["approach"]["label"]].append(run)
    for approaches in grouped.values():
        for label in approaches:
            approaches[label].sort(key=lambda r: r["seed"])
    return grouped


def _row_order(labels: Iterable[str]) -> list[str]:
    def rank(label: str) -> tuple[int, str]:
        if label.startswith("Pretrained"):
            return (0, label)
        if label == "Shuffle":
            return (1, label)
        return (2, label)

    return sorted(labels, key=rank)


# ---------------------------------------------------------------------------------- tables
Column = tuple[str, Callable[[dict[str, Any]], float], Callable[[dict[str, Any]], float] | None]


def _table(
    title: str,
    legend: str,
    grouped: dict[str, dict[str, list[dict[str, Any]]]],
    columns: Sequence[Column],
    higher_is_better: bool = True,
    digits: int = 2,
) -> str:
    """Rows dataset × approach; each column maps a run to a number (and manual runs to one)."""
    header = "| Dataset | Approach | " + " | ".join(c[0] for c in columns) + " | seeds |"
    lines = [f"### {title}", "", legend, "", header, "|" + "---|" * (len(columns) + 3)]
    for dataset, approaches in grouped.items():
        any_runs = next(iter(approaches.values()))
        rows: list[tuple[str, list[Stat], str]] = []
        manual_cells = [
            Stat(tuple(c[2](r) for r in any_runs[:1])) if c[2] else Stat(()) for c in columns
        ]
        rows.append((MANUAL, manual_cells, "–"))
        for label in _row_order(approaches):
            runs = approaches[label]
            cells = [Stat(tuple(c[1](r) for r in runs)) for c in columns]
            rows.append((label, cells, ", ".join(str(r["seed"]) for r in runs)))
        bold = _bold_mask([cells for _, cells, _ in rows], higher_is_better)
        for (label, cells, seeds), marks in zip(rows, bold, strict=True):
            texts = [
                f"**{c.format(digits)}**" if m else c.format(digits)
                for c, m in zip(cells, marks, strict=True)
            ]
            lines.append(f"| {dataset} | {label} | " + " | ".join(texts) + f" | {seeds} |")
    return "\n".join(lines) + "\n"


def _bold_mask(rows: list[list[Stat]], higher_is_better: bool) -> list[list[bool]]:
    marks = [[False] * len(rows[0]) for _ in rows]
    for col in range(len(rows[0])):
        cells = [(i, row[col]) for i, row in enumerate(rows) if not math.isnan(row[col].mean)]
        if len(cells) < 2:
            continue
        best_i, best = max(cells, key=lambda ic: ic[1].mean if higher_is_better else -ic[1].mean)
        for i, cell in cells:
            if abs(cell.mean - best.mean) <= max(cell.sd, best.sd) or i == best_i:
                marks[i][col] = True
    return marks


def final_map(run: dict[str, Any], key: str = "map50") -> float:
    curve = [p for p in run.get("map_curve", []) if p.get(key) is not None]
    return float(curve[-1][key]) if curve else math.nan


def markdown_report(runs: list[dict[str, Any]], config: ExperimentConfig) -> str:
    """The whole report: Tables 1–2 as in the paper, the strict convention, time and mAP."""
    grouped = group_runs(runs)
    if not grouped:
        return f"# Benchmark {config.name}\n\nNo runs found.\n"
    taus, t0 = config.iou_thresholds, config.seconds_per_box[0]
    seeds = sorted({r["seed"] for r in runs})
    parts = [
        f"# Benchmark `{config.name}`",
        "",
        f"Runs: {len(runs)}; seeds {', '.join(map(str, seeds))}; batch size {config.batch_size}; "
        f"IoU τ {', '.join(f'{t:g}' for t in taus)}; score thresholds "
        f"{', '.join(f'{s:g}' for s in config.score_thresholds)}; T = "
        f"{', '.join(f'{t:g}' for t in config.seconds_per_box)} s (T is our choice; the paper "
        "gives no value for it). "
        "Entries are mean ± sd over the seeds listed in each row. **Bold**: the column's best in its "
        "dataset, or within the spread of it (|Δ| ≤ the larger sd), i.e. not distinguishable from the best. "
        "Saved % = 100·(1 − W / W_manual); W_manual labels every box by hand. "
        "The percentages do not depend on T (every term is a multiple of T). "
        f"Main tables: difficult / DontCare objects {config.ignored_objects} "
        f"(`ignored_objects`); Table 1* shows the other treatment. See docs/benchmark.md.",
        "",
        _dataset_table(runs),
    ]
    mode = config.ignored_objects
    other: IgnoredObjects = next(m for m in IGNORED_OBJECTS if m != mode)
    scores = score_columns(config, runs)
    gate_note = (
        " Gate's threshold: each batch corrected at the score threshold the promotion gate chose "
        "for the version that predicted it."
        if GATE in scores
        else ""
    )

    def reduction(
        metric: str,
        tau: float,
        score: Score,
        convention: Convention = "paper",
        ignored: IgnoredObjects = mode,
        name: str | None = None,
    ) -> Column:
        def cell(run: dict[str, Any]) -> float:
            w = run_workload(run, config, tau, score, convention, t0, ignored)
            return w.saved_t_pct if metric == "t" else w.saved_b_pct

        return (name or score_label(score), _or_nan(cell), lambda _r: 0.0)

    for tau in taus:
        parts.append(
            _table(
                f"Table 1 (τ={tau:g}). Reduction of annotation time W_T (%), paper convention",
                "W_T = B1n·T + A·T + R·T/2; higher is better; one column per score threshold the "
                f"annotator is shown. {ignored_caption(mode)}{gate_note}",
                grouped,
                [reduction("t", tau, s) for s in scores],
            )
        )
    for tau in taus:
        parts.append(
            _table(
                f"Table 1* (τ={tau:g}). Reduction of annotation time W_T (%), paper convention, "
                f"ignored objects {other}",
                f"As Table 1 with the other treatment of ignored ground truth. {ignored_caption(other)}",
                grouped,
                [reduction("t", tau, s, ignored=other) for s in scores],
            )
        )
    for tau in taus:
        parts.append(
            _table(
                f"Table 2 (τ={tau:g}). Reduction of workload in boxes W_B (%), paper convention",
                f"W_B = B1n + A + R; higher is better. {ignored_caption(mode)}",
                grouped,
                [reduction("b", tau, s) for s in scores],
            )
        )
    for tau in taus:
        strict_cols = [
            reduction("t", tau, s, "strict", name=f"W_T {score_label(s)}") for s in scores
        ] + [reduction("b", tau, s, "strict", name=f"W_B {score_label(s)}") for s in scores]
        parts.append(
            _table(
                f"Table 3 (τ={tau:g}). Reduction (%), strict convention",
                f"An accepted box with IoU < {config.tight_iou:g} costs an adjustment "
                f"({config.adjustment_fraction:g}·T, one box in W_B); a wrong class costs a removal "
                f"plus an addition. Never cheaper than the paper's convention. {ignored_caption(mode)}",
                grouped,
                strict_cols,
            )
        )
    parts.append(_hours_table(grouped, config, scores))
    for score in scores:
        parts.append(_corrections_table(grouped, config, score))
    parts.append(_map_table(grouped))
    parts.append(_timing_table(grouped))
    gate = _gate_table(runs)
    if gate:
        parts.append(gate)
    return "\n".join(parts)


def _dataset_table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "### Datasets",
        "",
        "Pool boxes exclude ignored regions (difficult / DontCare / crowd); skipped images: "
        "files that could not be decoded, left out of pool and held-out split.",
        "",
        "| Dataset | labels | pool images | pool boxes | ignored regions | held-out images "
        "| skipped images | batches |",
        "|---|---|---|---|---|---|---|---|",
    ]
    seen = set()
    for run in runs:
        d = run["dataset"]
        if d["name"] in seen:
            continue
        seen.add(d["name"])
        lines.append(
            f"| {d['name']} | {len(d['labels'])} | {d['pool_images']} | {d['pool_boxes']} | "
            f"{d['pool_ignored']} | {d['holdout_images']} | {len(d.get('skipped_images', []))} | "
            f"{len(run['batches'])} |"
        )
    return "\n".join(lines) + "\n"


def _hours_table(
    grouped: dict[str, dict[str, list[dict[str, Any]]]],
    config: ExperimentConfig,
    scores: Sequence[Score],
) -> str:
    tau, mode = config.iou_thresholds[0], config.ignored_objects
    columns: list[Column] = []
    for score in scores:
        for t in config.seconds_per_box:

            def cell(run: dict[str, Any], t: float = t, score: Score = score) -> float:
                return run_workload(run, config, tau, score, "paper", t).w_t / 3600

            def manual(run: dict[str, Any], t: float = t) -> float:
                return compute_workload(manual_tallies(run, mode), cost_model(config, t)).w_t / 3600

            columns.append((f"{score_label(score)}, T={t:g} s", _or_nan(cell), manual))
    return _table(
        f"Table 4. Annotation time W_T in hours, τ={tau:g}",
        "Absolute time for the whole pool; lower is better (not bolded). " + ignored_caption(mode),
        grouped,
        columns,
        higher_is_better=False,
        digits=3,
    ).replace("**", "")


def _corrections_table(
    grouped: dict[str, dict[str, list[dict[str, Any]]]], config: ExperimentConfig, score: Score
) -> str:
    tau, mode = config.iou_thresholds[0], config.ignored_objects

    def total(field: str) -> Callable[[dict[str, Any]], float]:
        @_or_nan
        def cell(run: dict[str, Any]) -> float:
            tallies = batch_tallies(run, tau, score, mode)
            if field == "b1n":
                return float(sum(t.boxes for t in tallies if t.manual))
            return float(
                sum(getattr(t.correction, field) for t in tallies if t.correction is not None)
            )

        return cell

    def manual_boxes(run: dict[str, Any]) -> float:
        return float(sum(batch_boxes(b, mode) for b in run["batches"]))

    columns: list[Column] = [
        ("B1n", total("b1n"), manual_boxes),
        ("A", total("additions"), None),
        ("R", total("removals"), None),
        ("accepted", total("accepted"), None),
        ("loose", total("loose"), None),
        ("wrong class", total("wrong_class"), None),
        ("ignored", total("ignored"), None),
    ]
    return _table(
        f"Table 5. Corrections summed over batches, τ={tau:g}, {score_label(score)}",
        "B1n: boxes drawn from scratch; A additions; R removals; accepted predictions; loose: accepted "
        f"but IoU < {config.tight_iou:g}; wrong class: removals on a box of another class; ignored: "
        "predictions on difficult / DontCare / crowd regions (neither accepted nor removed). "
        + ignored_caption(mode),
        grouped,
        columns,
        digits=1,
    ).replace("**", "")


def records_trained_images(runs: Iterable[dict[str, Any]]) -> bool:
    """Whether every mAP point of every run says how many images its model trained on
    (``trained_images``; runs from before it was recorded do not)."""
    return all("trained_images" in p for r in runs for p in r.get("map_curve", []))


def _map_table(grouped: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    runs = [r for approaches in grouped.values() for rs in approaches.values() for r in rs]
    trained = records_trained_images(runs)
    columns: list[Column] = (
        [
            ("mAP@0.5 first trained model", lambda r: _first_map(r, "map50", trained=True), None),
            ("its training images", _first_trained_images, None),
        ]
        if trained
        else [("mAP@0.5 first point", lambda r: _first_map(r, "map50"), None)]
    )
    columns += [
        ("mAP@0.5 final", lambda r: final_map(r, "map50"), None),
        ("mAP@[.5:.95] final", lambda r: final_map(r, "map50_95"), None),
    ]
    first = (
        "First trained model: the first model of the curve that trained on labelled images "
        "(Faster R-CNN: M1, on B1; the YOLOX loop: the first promoted version, on as many images "
        "as the next column says (a validation slice may be held back); the pretrained model "
        "never trains: –)"
        if trained
        else "First point: the first model of the curve, not always one trained on B1 (the "
        "pretrained baseline and the YOLOX loop where the COCO model knows the labels: the "
        "untrained COCO model; the loop otherwise: the first promoted version; Faster R-CNN: "
        "M1, trained on B1). These runs do not record what each point's model trained on"
    )
    return _table(
        "Table 6. mAP on the held-out split (pycocotools)",
        f"{first}; final: the curve's last point (Faster R-CNN with `final_round`: trained on "
        "every batch; the YOLOX loop: the version serving after the last round, a rejected "
        "candidate leaving its predecessor serving). Difficult / DontCare / crowd regions are ignored as in each "
        "dataset's own evaluation, whatever `ignored_objects` says (mAP follows the datasets' "
        "protocols).",
        grouped,
        columns,
        digits=3,
    )


def _first_point(run: dict[str, Any], key: str, trained: bool = False) -> dict[str, Any] | None:
    """The curve's first point with a ``key`` value (``trained``: whose model trained on
    labelled images, not the COCO model)."""
    return next(
        (
            p
            for p in run.get("map_curve", [])
            if p.get(key) is not None and (not trained or p.get("trained_images", 0) > 0)
        ),
        None,
    )


def _first_map(run: dict[str, Any], key: str, trained: bool = False) -> float:
    point = _first_point(run, key, trained)
    return math.nan if point is None else float(point[key])


def _first_trained_images(run: dict[str, Any]) -> float:
    point = _first_point(run, "map50", trained=True)
    return math.nan if point is None else float(point["trained_images"])


def _timing_table(grouped: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    def seconds(key: str) -> Callable[[dict[str, Any]], float]:
        return lambda r: float(r["seconds"].get(key, math.nan))

    columns: list[Column] = [
        ("features", seconds("features"), None),
        ("ordering", seconds("ordering"), None),
        ("train", seconds("train"), None),
        ("predict", seconds("predict"), None),
        ("mAP", seconds("evaluate"), None),
        ("total", seconds("total"), None),
    ]
    return _table(
        "Table 7. Compute seconds per run (this machine)",
        "Wall-clock seconds; features are computed once per dataset and extractor and shared by runs.",
        grouped,
        columns,
        digits=1,
    ).replace("**", "")


def gate_rows(runs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per dataset and approach: candidates, promoted, rejected, and promotions whose candidate
    scored below the serving version on the slice (the gate's invariant: always 0)."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for run in runs:
        for batch in run["batches"]:
            gate = batch.get("gate")
            if not gate:
                continue
            key = (run["dataset"]["name"], run["approach"]["label"])
            row = out.setdefault(
                key,
                {
                    "dataset": key[0],
                    "approach": key[1],
                    "candidates": 0,
                    "promoted": 0,
                    "rejected": 0,
                    "worse_promoted": 0,
                    "serves_no_boxes": 0,
                    "thresholds": [],
                },
            )
            row["candidates"] += 1
            if gate["status"] == "promoted":
                row["promoted"] += 1
                cand, serv = gate["validation"]["candidate"], gate["validation"]["serving"]
                c_map, s_map = cand["map50"] or 0.0, serv["map50"] or 0.0

                def best_wb(score: dict[str, Any]) -> float:
                    return next(
                        t["w_b"]
                        for t in score["thresholds"]
                        if t["score_threshold"] == score["best_threshold"]
                    )

                if c_map < s_map - 1e-9 or best_wb(cand) > best_wb(serv) + 1e-9:
                    row["worse_promoted"] += 1
                if not gate["serves_boxes"]:
                    row["serves_no_boxes"] += 1
                row["thresholds"].append(gate["score_threshold"])
            else:
                row["rejected"] += 1
    return list(out.values())


def _gate_table(runs: list[dict[str, Any]]) -> str:
    rows = gate_rows(runs)
    if not rows:
        return ""
    lines = [
        "### Table 8. The promotion gate",
        "",
        "Each round's candidate against the serving version on the round's validation slice "
        "(mAP@0.5 and W_B at the threshold each model would serve at: least W_T, or within one standard error of it and nearest the product's default), summed over seeds. *Worse promoted*: "
        "promotions whose candidate scored below its predecessor on either measure (the gate's "
        "invariant says 0). Thresholds: those the gate chose for the promoted versions.",
        "",
        "| Dataset | Approach | candidates | promoted | rejected | worse promoted | "
        "serving no boxes | thresholds chosen |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        chosen = ", ".join(f"{t:g}" for t in sorted(set(row["thresholds"]))) or "–"
        lines.append(
            f"| {row['dataset']} | {row['approach']} | {row['candidates']} | {row['promoted']} | "
            f"{row['rejected']} | {row['worse_promoted']} | {row['serves_no_boxes']} | {chosen} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- plots
def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text).strip("_")


def _mean_curve(
    curves: Sequence[Sequence[tuple[float, float]]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and sd over seeds at the x positions all curves share."""
    xs = sorted(set.intersection(*(set(x for x, _ in c) for c in curves)))
    ys = np.array([[dict(c)[x] for x in xs] for c in curves], dtype=float)
    sd = ys.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros(len(xs))
    return np.array(xs, float), ys.mean(axis=0), sd


def plot_curves(runs: list[dict[str, Any]], config: ExperimentConfig, out_dir: Path) -> list[Path]:
    """Per dataset: cumulative W_T vs images labelled, and held-out mAP@0.5 vs images labelled.

    W_T is drawn at the first τ and T, the middle score threshold and ``config.ignored_objects``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tau, t = config.iou_thresholds[0], config.seconds_per_box[0]
    score = sorted(config.score_thresholds)[len(config.score_thresholds) // 2]  # the middle one
    written = []
    for dataset, approaches in group_runs(runs).items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        any_run = next(iter(approaches.values()))[0]
        n_images = sum(b["images"] for b in any_run["batches"])
        mode = config.ignored_objects
        manual_total = compute_workload(manual_tallies(any_run, mode), cost_model(config, t)).w_t
        unit, per = ("hours", 3600.0) if manual_total >= 2 * 3600 else ("minutes", 60.0)
        # Drawing everything by hand costs the same whatever the order; its expected
        # cumulative cost over a random order is the straight line.
        ax.plot([0, n_images], [0, manual_total / per], "k--", label=MANUAL)
        for label in _row_order(approaches):
            curves = [
                cumulative_seconds(batch_tallies(r, tau, score, mode), cost_model(config, t))
                for r in approaches[label]
            ]
            x, mean, sd = _mean_curve([[(px, py / per) for px, py in c] for c in curves])
            (line,) = ax.plot(x, mean, marker="o", markersize=3, label=label)
            ax.fill_between(x, mean - sd, mean + sd, color=line.get_color(), alpha=0.15)
        ax.set_xlabel("images labelled")
        ax.set_ylabel(f"cumulative W_T ({unit}, T = {t:g} s)")
        ax.set_title(
            f"{dataset}: annotation time, τ = {tau:g}, score ≥ {score:g}, ignored objects {mode}"
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        path = out_dir / f"workload_{_slug(dataset)}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

        fig, ax = plt.subplots(figsize=(7, 4.5))
        plotted = False
        for label in _row_order(approaches):
            map_curves = [
                [
                    (float(p["images_labeled"]), float(p["map50"]))
                    for p in r.get("map_curve", [])
                    if p.get("map50") is not None
                ]
                for r in approaches[label]
            ]
            if not all(map_curves):
                continue
            x, mean, sd = _mean_curve(map_curves)
            if len(x) == 1:  # never retrained (pretrained only): one model for every batch
                x = np.array([0.0, float(n_images)])
                mean, sd = np.repeat(mean, 2), np.repeat(sd, 2)
            style = "--" if len(map_curves[0]) == 1 else "o-"
            (line,) = ax.plot(x, mean, style, markersize=3, label=label)
            ax.fill_between(x, mean - sd, mean + sd, color=line.get_color(), alpha=0.15)
            plotted = True
        ax.set_xlabel("images labelled (the loop's serving model may have trained on fewer)")
        ax.set_ylabel("held-out mAP@0.5")
        ax.set_ylim(bottom=0.0)
        ax.set_title(f"{dataset}: mAP vs images labelled")
        ax.grid(alpha=0.3)
        if plotted:
            ax.legend(fontsize=8)
        path = out_dir / f"map_{_slug(dataset)}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def grid_dataset(run: dict[str, Any], config: ExperimentConfig) -> DatasetConfig | None:
    """The dataset of ``config`` a run was made on (same name and spec), or None."""
    stored = run.get("dataset", {})
    return next(
        (
            d
            for d in config.datasets
            if d.display_name == stored.get("name") and d.spec == stored.get("spec")
        ),
        None,
    )


def belongs_to_grid(
    run: dict[str, Any], config: ExperimentConfig, run_key: RunKey | None = None
) -> bool:
    """Whether a stored run is one of ``config``'s grid: a schema this module reads, its dataset,
    approach, seed and batch size, and, given ``run_key``, its run key (which covers every setting
    that changes a run). Why: a grid's folder keeps the run files of an earlier grid (other seeds, approaches,
    an interrupted re-run with another batch size), which must not be averaged in.

    The key is checked with the groups of identical images the run recorded (a report cannot
    hash the dataset's files); a run from before they were recorded is checked without them.
    """
    dataset = grid_dataset(run, config)
    if run.get("schema") not in READABLE_SCHEMAS or dataset is None:
        return False
    if run.get("approach", {}).get("slug") not in {a.slug for a in config.approaches}:
        return False
    if run.get("seed") not in config.seeds or run.get("batch_size") != config.batch_size:
        return False
    duplicates = run["dataset"].get("duplicate_images") or []
    return run_key is None or run.get("run_key") == run_key(dataset, duplicates)


def load_grid_runs(
    out_dir: Path, config: ExperimentConfig, run_key: RunKey | None = None
) -> list[dict[str, Any]]:
    """The runs under ``out_dir/runs`` that :func:`belongs_to_grid`, counts they lack for
    ``config`` made and stored back; the files left out are named in one warning."""
    runs, skipped = [], []
    for path in sorted((out_dir / "runs").glob("*.json")):
        run = json.loads(path.read_text())
        if not belongs_to_grid(run, config, run_key):
            skipped.append(path.name)
            continue
        if refresh_corrections(run, config):  # a new τ, threshold, treatment or rule
            write_json(path, run)
        runs.append(run)
    if skipped:
        warnings.warn(
            f"{len(skipped)} run file(s) under {out_dir / 'runs'} belong to another grid than "
            f"experiment.json's and are left out: {', '.join(skipped)}",
            StaleRunWarning,
            stacklevel=2,
        )
    return runs


def write_report(
    out_dir: Path,
    config: ExperimentConfig,
    runs: list[dict[str, Any]] | None = None,
    run_key: RunKey | None = None,
) -> list[Path]:
    """``report.md`` and the PNG plots under ``out_dir`` (runs not given: those of ``config``'s
    grid under ``out_dir/runs``, see :func:`load_grid_runs`; counts they lack for ``config`` are
    made and stored back into their files)."""
    if runs is None:
        runs = load_grid_runs(out_dir, config, run_key)
    rank = {d.spec: i for i, d in enumerate(config.datasets)}  # datasets in the config's order
    order = {a.label: i for i, a in enumerate(config.approaches)}  # then approaches, seeds

    def position(run: dict[str, Any]) -> tuple[int, int, int]:
        dataset = rank.get(run["dataset"].get("spec"), len(rank))
        return dataset, order.get(run["approach"]["label"], len(order)), int(run["seed"])

    runs = sorted(runs, key=position)
    for run in runs:  # counts a run lacks for this config (new τ, threshold, treatment)
        refresh_corrections(run, config)
    report = out_dir / "report.md"
    plots = plot_curves(runs, config, out_dir / "plots")
    text = markdown_report(runs, config)
    if plots:
        text += "\n### Plots\n\n" + "\n".join(f"![{p.stem}](plots/{p.name})" for p in plots) + "\n"
    report.write_text(text)
    return [report, *plots]
