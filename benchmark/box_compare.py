"""Compare stored box-bench grids that differ in how partly labelled images train.

    python -m benchmark.box_compare benchmark/results/box benchmark/results/box_lambda0 \
        benchmark/results/box_checked_only -o benchmark/results/box_checked_only/compare.md

Each grid's own report compares its approaches at its own common budget, which moves when a
training rule makes queries find more objects. This table puts every grid at one budget per
dataset (the smallest final box count of any approach in any grid) and marks where a box-level
approach beats the image-level one with the same measure *outside the seed spread*: its
mean − sd is above the image-level mean + sd. Reads ``runs/*.json``; runs nothing.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmark.box_report import map_at

__all__ = ["compare_grids", "main"]


def _load(grid: Path) -> dict[str, list[dict[str, Any]]]:
    """dataset → runs (one per seed) of the grid stored under ``grid``."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for path in sorted((grid / "runs").glob("*.json")):
        run = json.loads(path.read_text())
        runs.setdefault(run["dataset"], []).append(run)
    if not runs:
        raise SystemExit(f"{grid}: no runs/*.json")
    return runs


def _weights(grid: Path) -> str:
    """The grid's training rule, as a column title."""
    config = json.loads((grid / "experiment.json").read_text())
    rule = f"λ_d {config['noisy_weight']}, background {config.get('background_weight', 1.0)}"
    return rule + (", warm start" if config.get("warm_start") else "")


def compare_grids(grids: Sequence[Path]) -> str:
    """The comparison as Markdown."""
    loaded = {grid: _load(grid) for grid in grids}
    first = json.loads((grids[0] / "experiment.json").read_text())
    named = [d.get("name") or d["spec"] for d in first["datasets"]]
    stored = list(loaded[grids[0]])
    datasets = [d for d in named if d in stored] + [d for d in stored if d not in named]
    approaches = [f"box:{m}" for m in first["box_measures"]] + [
        f"image:{m}" for m in first["image_measures"]
    ]
    lines = [
        "# Box-level training rules compared at one budget per dataset",
        "",
        "Held-out mAP@0.5, mean ± sd over seeds, interpolated at the budget (ground-truth boxes "
        "obtained). **Bold**: the box-level approach beats image-level with the same measure "
        "outside the seed spread (box mean − sd > image mean + sd). Image-level campaigns label "
        "whole images, so grids that differ only in λ_d or the background weight share their "
        "image rows (a warm start changes them too).",
        "",
        "Grids: " + "; ".join(f"`{g}` ({_weights(g)})" for g in grids) + ".",
        "",
    ]
    for dataset in datasets:
        per_grid = {g: loaded[g].get(dataset, []) for g in grids}
        budget = min(
            min(curve[-1]["boxes_labeled"] for run in runs for curve in run["curves"].values())
            for runs in per_grid.values()
            if runs
        )
        stats: dict[tuple[Path, str], tuple[float, float, str]] = {}
        for g, runs in per_grid.items():
            for approach in approaches:
                values = [
                    map_at(r["curves"][approach], budget) for r in runs if approach in r["curves"]
                ]
                # a seed whose curve does not span the budget (NaN) is left out and counted
                spanning = [v for v in values if not math.isnan(v)]
                if spanning:
                    sd = float(np.std(spanning, ddof=1)) if len(spanning) > 1 else 0.0
                    note = (
                        ""
                        if len(spanning) == len(values)
                        else (f" ({len(spanning)}/{len(values)} seeds)")
                    )
                    stats[g, approach] = (float(np.mean(spanning)), sd, note)
        lines += [
            f"## {dataset} at {budget} boxes",
            "",
            "| approach | " + " | ".join(_weights(g) for g in grids) + " |",
            "|---" * (len(grids) + 1) + "|",
        ]
        for approach in approaches:
            cells = []
            for g in grids:
                if (g, approach) not in stats:
                    cells.append("—")
                    continue
                mean, sd, note = stats[g, approach]
                text = f"{mean:.3f} ± {sd:.3f}{note}"
                level, measure = approach.split(":")
                twin = stats.get((g, f"image:{measure}"))
                if level == "box" and twin is not None and mean - sd > twin[0] + twin[1]:
                    text = f"**{text}**"
                cells.append(text)
            lines.append(f"| {approach} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("grids", nargs="+", type=Path, help="box bench output folders")
    parser.add_argument("-o", "--out", type=Path, help="write the Markdown here (default: print)")
    args = parser.parse_args(argv)
    text = compare_grids(args.grids)
    if args.out is None:
        print(text)
    else:
        args.out.write_text(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
