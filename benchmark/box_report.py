"""Report of ``boxloop bench box``: tables (Markdown) and plots (PNG) from the stored runs.

* mAP@0.5 on the held-out split against boxes labelled, per approach, mean ± sd over seeds;
* boxes needed to reach 80 / 90 / 100 % of the fully supervised mAP (linear interpolation
  between episodes; "—" where a seed never reaches it), as a share of the pool's objects;
* mAP at a common box budget (the smallest final budget of the approaches), so box- and
  image-level querying are compared at equal box counts;
* both of these under both cost conventions: boxes labelled (the paper's) and boxes looked at
  (background, duplicate and ignored queries cost a look too);
* the queries that found no box: background apart from duplicate and ignored ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmark.box_config import BoxBenchConfig

__all__ = ["boxes_to_reach", "map_at", "write_box_report"]

LEVELS = (0.8, 0.9, 1.0)
ANCHORS = (
    "Anchors (not reproduced here): the paper reaches 85 % of the fully supervised mAP with 50 % "
    "of the boxes on VOC 2012 (FPN Faster R-CNN, thousands of images); BLAD/ComPAS (CVPR 2023) "
    "reaches 100 % of full VOC0712 performance with 19 % of the box annotations."
)


def _xy(curve: Sequence[dict[str, Any]], cost: str) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.array([p[cost] for p in curve], float),
        np.array([p["map50"] for p in curve], float),
    )


def boxes_to_reach(
    curve: Sequence[dict[str, Any]], target: float, cost: str = "boxes_labeled"
) -> float:
    """Boxes at which the curve first reaches ``target`` mAP (interpolated), NaN if never."""
    x, y = _xy(curve, cost)
    if y[0] >= target:
        return float(x[0])
    for i in range(1, len(x)):
        if y[i] >= target:
            if y[i] == y[i - 1]:
                return float(x[i])
            return float(x[i - 1] + (target - y[i - 1]) * (x[i] - x[i - 1]) / (y[i] - y[i - 1]))
    return math.nan


def map_at(curve: Sequence[dict[str, Any]], boxes: float, cost: str = "boxes_labeled") -> float:
    """mAP interpolated at ``boxes``; NaN outside the curve: beyond its last point, and below its
    first (a seed whose initial set already held more boxes never had a model at ``boxes``)."""
    x, y = _xy(curve, cost)
    if boxes < x.min() - 1e-9 or boxes > x.max() + 1e-9:
        return math.nan
    order = np.argsort(x, kind="stable")
    return float(np.interp(boxes, x[order], y[order]))


def _ms(values: Sequence[float], digits: int = 3) -> str:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return "—"
    if len(vals) < len(values):
        return f"{np.mean(vals):.{digits}f} ({len(vals)}/{len(values)} seeds)"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{np.mean(vals):.{digits}f} ± {np.std(vals, ddof=1):.{digits}f}"


def write_box_report(
    out: Path, config: BoxBenchConfig, runs: Sequence[dict[str, Any]]
) -> list[Path]:
    """Write ``report.md`` and ``plots/box_<dataset>.png``; returns the files written."""
    out = Path(out)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    lines = [
        "# Box-level against image-level active learning",
        "",
        f"Config: `{config.name}`; seeds run {sorted({r['seed'] for r in runs})} "
        f"(of {list(config.seeds)}); {config.episodes} episodes of "
        f"K = {config.k_fraction:.0%} of the pool's objects; initial random images "
        f"{config.init_fraction:.0%}; t_d {config.t_d}; λ_d {config.noisy_weight}; "
        f"unchecked background on partly labelled images weighs {config.background_weight}; "
        + (
            "each episode's model continues from the last (warm start), so it can pass the "
            "fully supervised model, which trains once. "
            if config.warm_start
            else "each episode retrains from the COCO weights. "
        )
        + "Held-out mAP@0.5 (COCO-style, pycocotools). *Boxes labelled* = ground-truth boxes "
        "obtained (the paper's cost); *looked at* adds every background, duplicate or ignored "
        "query (one on a difficult or crowd object).",
        "",
        ANCHORS,
        "",
    ]
    datasets = sorted({r["dataset"] for r in runs}, key=[r["dataset"] for r in runs].index)
    for name in datasets:
        mine = [r for r in runs if r["dataset"] == name]
        # the approaches every seed of this dataset has (a grid stopped part way may lack some)
        approaches = [a for a in mine[0]["curves"] if all(a in r["curves"] for r in mine)]
        full = [r["full_map50"] for r in mine]
        objects = mine[0]["pool_objects"]
        lines += [
            f"## {name}",
            "",
            f"Pool {mine[0]['pool_images']} images, {objects} objects; held out "
            f"{mine[0]['test_images']} images; K = {mine[0]['k']} boxes an episode; fully "
            f"supervised mAP@0.5 {_ms(full)}.",
            "",
            "| approach | boxes to 80 % of full | to 90 % | to 100 % | mAP at the common "
            "budget | final boxes labelled / looked at | background queries | duplicate / "
            "ignored queries |",
            "|---|---|---|---|---|---|---|---|",
        ]
        budget, reach = _cost_cells(mine, approaches, "boxes_labeled")
        for a in approaches:
            last = [r["curves"][a][-1] for r in mine]
            labeled = np.mean([p["boxes_labeled"] for p in last])
            looked = np.mean([p["boxes_looked_at"] for p in last])
            background = np.mean([p.get("background", 0) for p in last])
            wasted = np.mean([p.get("duplicate", 0) + p.get("ignored", 0) for p in last])
            lines.append(
                f"| {a} | {' | '.join(reach[a])} | {labeled:.0f} / {looked:.0f} | "
                f"{background:.0f} | {wasted:.0f} |"
            )
        looked_budget, looked_cells = _cost_cells(mine, approaches, "boxes_looked_at")
        lines += [
            "",
            f"Common budget: {budget} boxes labelled ({budget / objects:.0%} of the pool's "
            "objects). Shares are of the pool's objects; a seed that never reaches a level is "
            "left out of the mean and counted in brackets, as is a seed whose curve does not "
            "span the common budget. Queries over the whole campaign, mean over seeds: "
            "*background* (no object there), *duplicate* (a second query on one object) or "
            "*ignored* (on a difficult or crowd object).",
            "",
            "The same counted in boxes looked at (every background, duplicate or ignored query "
            f"costs a look too); common budget {looked_budget} boxes looked at "
            f"({looked_budget / objects:.0%} of the pool's objects):",
            "",
            "| approach | looked at to 80 % of full | to 90 % | to 100 % | mAP at the common "
            "looked-at budget |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {a} | {' | '.join(looked_cells[a])} |" for a in approaches]
        lines += [
            "",
            "| approach | " + " | ".join(f"episode {i}" for i in range(config.episodes + 1)) + " |",
            "|---|" + "---|" * (config.episodes + 1),
        ]
        for a in approaches:
            cells = []
            for e in range(config.episodes + 1):
                pts = [r["curves"][a][e] for r in mine if len(r["curves"][a]) > e]
                boxes = np.mean([p["boxes_labeled"] for p in pts])
                cells.append(f"{_ms([p['map50'] for p in pts])} @ {boxes:.0f}")
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
        lines.append("")
        files.append(_plot(out / "plots" / f"box_{_slug(name)}.png", name, mine, approaches, full))
        lines += [f"![{name}](plots/{files[-1].name})", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return [report, *files]


def _cost_cells(
    runs: Sequence[dict[str, Any]], approaches: Sequence[str], cost: str
) -> tuple[float, dict[str, list[str]]]:
    """One cost convention's cells per approach: boxes to reach each of ``LEVELS`` of the fully
    supervised mAP (a share of the pool's objects) and mAP at the common budget, the smallest
    final ``cost`` of any approach. Returns the budget and the cells."""
    objects = runs[0]["pool_objects"]
    budget = min(r["curves"][a][-1][cost] for r in runs for a in approaches)
    cells: dict[str, list[str]] = {}
    for a in approaches:
        cells[a] = [
            _pct(
                [
                    boxes_to_reach(r["curves"][a], level * r["full_map50"], cost) / objects
                    for r in runs
                ]
            )
            for level in LEVELS
        ] + [_ms([map_at(r["curves"][a], budget, cost) for r in runs])]
    return budget, cells


def _pct(values: Sequence[float]) -> str:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return "not reached"
    text = f"{100 * np.mean(vals):.0f} %"
    if len(vals) > 1:
        text = f"{100 * np.mean(vals):.0f} ± {100 * np.std(vals, ddof=1):.0f} %"
    if len(vals) < len(values):
        text += f" ({len(vals)}/{len(values)})"
    return text


def _plot(
    path: Path,
    name: str,
    runs: Sequence[dict[str, Any]],
    approaches: Sequence[str],
    full: Sequence[float],
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for a in approaches:
        curves = [r["curves"][a] for r in runs]
        n = min(len(c) for c in curves)
        x = np.mean([[p["boxes_labeled"] for p in c[:n]] for c in curves], axis=0)
        y = np.array([[p["map50"] for p in c[:n]] for c in curves])
        style = "-" if a.startswith("box:") else "--"
        ax.plot(x, y.mean(0), style, marker="o", label=a)
        if len(curves) > 1:
            ax.fill_between(x, y.mean(0) - y.std(0), y.mean(0) + y.std(0), alpha=0.15)
    ax.axhline(float(np.mean(full)), color="k", lw=0.8, ls=":", label="fully supervised")
    ax.set_xlabel("boxes labelled")
    ax.set_ylabel("held-out mAP@0.5")
    ax.set_title(f"{name}: box- vs image-level querying (mean ± sd over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)
