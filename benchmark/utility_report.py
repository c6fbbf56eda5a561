"""Tables and plots of ``boxloop bench utility`` (see :mod:`benchmark.utility_bench`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["brisque_overlap", "write_utility_report"]

METHODS = ("predictor", "jpeg_quality", "laplacian_var", "brisque", "random")
TESTS = (("jpeg", "JPEG test"), ("png", "same pixels as PNG"), ("unseen", "unseen distortion"))


def _mean_sd(values: Sequence[float | None]) -> str:
    clean = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not clean:
        return "–"
    if len(clean) == 1:
        return f"{100 * clean[0]:.1f}"
    return f"{100 * np.mean(clean):.1f} ± {100 * np.std(clean, ddof=1):.1f}"


def _count(values: Sequence[int]) -> str:
    """Test items over seeds: one number when every seed has it, else mean ± sd (each seed
    splits the sources anew, so one seed's count would stand in for counts it is not)."""
    if len(set(values)) == 1:
        return str(values[0])
    return f"{np.mean(values):.0f} ± {np.std(values, ddof=1):.0f}"


def _useful_share(chosen: Sequence[dict[str, Any]], key: str) -> str:
    """The useful share of test ``key``'s own items (the accuracy a constant "useful" gets).
    The unseen test has its own; results stored before it was kept say so instead of showing
    the JPEG test's share in its place."""
    name = "unseen_useful_share" if key == "unseen" else "test_useful_share"
    if any(name not in r for r in chosen):
        return "not stored"
    return _mean_sd([r[name] for r in chosen])


def brisque_overlap(useful: np.ndarray, useless: np.ndarray, bins: np.ndarray) -> float:
    """Overlap coefficient of two normalised histograms: Σ min(p, q) (1 = indistinguishable)."""
    if not len(useful) or not len(useless):
        return float("nan")
    p, _ = np.histogram(useful, bins=bins)
    q, _ = np.histogram(useless, bins=bins)
    return float(np.minimum(p / p.sum(), q / q.sum()).sum())


def write_utility_report(out: Path, summary: dict[str, Any], items: Sequence[Any]) -> list[Path]:
    """``report.md`` and PNG plots in ``out``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in summary["runs"] if "accuracy" in r]
    labelings = list(dict.fromkeys(r["labeling"] for r in summary["runs"]))
    config, facts = summary["config"], summary["facts"]
    lines = [
        "# Image utility for machines: `boxloop bench utility`",
        "",
        f"Datasets {', '.join(f'{k} ({v} images)' for k, v in facts['datasets'].items())}; "
        f"training JPEG qualities {config['qualities']}; held-out qualities "
        f"{config['heldout_qualities']}; unseen distortion {config['unseen']}; labelers "
        f"YOLOX-Nano at {config['labelers']} px; unused detector YOLOX-Nano at "
        f"{config['unused_size']} px; seeds {config['seeds']}; "
        + (
            f"per seed, {config['folds']}-fold cross-validation over source images, the folds' "
            "test predictions pooled (every source tested once)"
            if config.get("folds")
            else f"per seed, one split holding out {config['test_fraction']:.0%} of the sources"
        )
        + f"; predictor {config['predictor']}.",
        "",
        f"Source images with a ground-truth box found on the pristine image by at least one "
        f"labeler: {facts['sources_with_a_found_box']} of {facts['sources']}. Distorted items: "
        f"{facts['items']}. ONNX@416 vs PyTorch@416 largest score difference over the pristine "
        f"images checked ({facts.get('twin_check_images', '?')}): "
        f"{facts['onnx416_vs_pytorch416_max_score_diff']:.2g} (one network). Labelers "
        f"agree on {100 * (summary['labels'].get('agreement_between_labelers') or float('nan')):.1f} % "
        f"of the items both define. Stage-1 seconds (summed over {facts.get('workers', 1)} worker(s)): "
        f"{facts.get('stage1_seconds_summed_over_workers')}; total "
        f"{summary['seconds']} s; load average at the end {summary['machine']['load']}.",
        "",
        "## Labels per distortion (combined vote)",
        "",
        "| distortion | useful | non-useful | dropped (disagree or undefined) |",
        "|---|---|---|---|",
    ]
    for distortion, row in summary["labels"]["vote"].items():
        lines.append(f"| {distortion} | {row['useful']} | {row['useless']} | {row['dropped']} |")
    lines += [
        "",
        "## Graded utility per distortion: Eq. (2) as printed / clipped form, mean over images",
        "",
        "Over the images a detector defines (vote: the mean of the detectors' values).",
        "",
        "| distortion | " + " | ".join(labelings) + " |",
        "|---|" + "---|" * len(labelings),
    ]
    for distortion in summary["labels"]["vote"]:
        cells = []
        for labeling in labelings:
            chosen = [i for i in items if i.distortion == distortion]
            graded = [i.graded[labeling] for i in chosen if not math.isnan(i.graded[labeling])]
            clipped = [i.clipped[labeling] for i in chosen if not math.isnan(i.clipped[labeling])]
            cells.append(f"{np.mean(graded):+.2f} / {np.mean(clipped):.2f}" if graded else "–")
        lines.append(f"| {distortion} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Accuracy per labeling (the paper's Table II layout), % mean ± sd over seeds",
        "",
        "Thresholds of the baselines tuned on each seed's training split. The random filter drops "
        "the predictor's share of test images.",
        "",
    ]
    for key, title in TESTS:
        lines += [
            f"### {title}",
            "",
            "| labeling | test items | useful share | " + " | ".join(METHODS) + " |",
            "|---|---|---|" + "---|" * len(METHODS),
        ]
        for labeling in labelings:
            chosen = [r for r in runs if r["labeling"] == labeling]
            if not chosen:
                lines.append(f"| {labeling} | – | – |" + " – |" * len(METHODS))
                continue
            count = _count([r["unseen" if key == "unseen" else "test"] for r in chosen])
            share = _useful_share(chosen, key)
            cells = [_mean_sd([r["accuracy"].get(m, {}).get(key) for r in chosen]) for m in METHODS]
            lines.append(f"| {labeling} | {count} | {share} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "## Predictor − best baseline, 95 % cluster-bootstrap interval (resampling source images)",
        "",
        "| labeling | seed | test | best baseline | difference (points) | 95 % interval |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        for key, _ in TESTS:
            d = r["difference"][key]
            if d["diff"] is None:
                continue
            lines.append(
                f"| {r['labeling']} | {r['seed']} | {key} | {d['vs']} | {100 * d['diff']:+.1f} | "
                f"[{100 * (d['low'] or 0):+.1f}, {100 * (d['high'] or 0):+.1f}] |"
            )
    lines += [
        "",
        "## Filtering: mAP@0.5 of the unused detector on held-out-quality JPEGs of test sources",
        "",
        "Drop the images the predictor (trained on the vote) calls non-useful, or as many at "
        "random (mean of draws); `true labels` drops the images whose vote is 0 (a reference).",
        "",
        "| seed | dataset | images | kept | all | predictor | random (sd) | true labels |",
        "|---|---|---|---|---|---|---|---|",
    ]
    filter_rows = []
    for r in runs:
        for dataset, row in (r.get("filtering") or {}).items():
            filter_rows.append(row)

            def f(v: float | None) -> str:
                return "–" if v is None or math.isnan(v) else f"{v:.3f}"

            lines.append(
                f"| {r['seed']} | {dataset} | {row['images']} | {row['kept']} | "
                f"{f(row['map_all'])} | {f(row['map_predictor'])} | {f(row['map_random'])} "
                f"({f(row['map_random_sd'])}) | {f(row['map_true_labels'])} |"
            )
    if filter_rows:
        diffs = [
            row["map_predictor"] - row["map_random"]
            for row in filter_rows
            if row["map_predictor"] is not None
            and row["map_random"] is not None
            and not math.isnan(row["map_predictor"])
            and not math.isnan(row["map_random"])
        ]
        if diffs:
            lines += [
                "",
                f"Predictor − random, mean over dataset × seed rows: {np.mean(diffs):+.3f} mAP "
                f"({sum(d >= 0 for d in diffs)} of {len(diffs)} rows ≥ 0).",
            ]
    files: list[Path] = []
    # BRISQUE overlap (Fig. 1)
    defined = [i for i in items if i.group != "heldout" and i.labels["vote"] is not None]
    useful = np.array([i.scores["brisque"] for i in defined if i.labels["vote"] == 1], float)
    useless = np.array([i.scores["brisque"] for i in defined if i.labels["vote"] == 0], float)
    useful, useless = useful[np.isfinite(useful)], useless[np.isfinite(useless)]
    if len(useful) and len(useless):
        lo = float(min(useful.min(), useless.min()))
        hi = float(max(useful.max(), useless.max()))
        bins = np.linspace(lo, hi + 1e-9, 31)
        overlap = brisque_overlap(useful, useless, bins)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.hist(
            useful, bins=bins.tolist(), alpha=0.6, density=True, label=f"useful (n={len(useful)})"
        )
        ax.hist(
            useless,
            bins=bins.tolist(),
            alpha=0.6,
            density=True,
            label=f"non-useful (n={len(useless)})",
        )
        ax.set_xlabel("BRISQUE (lower = better perceptual quality)")
        ax.set_ylabel("density")
        ax.set_title(f"BRISQUE of useful vs non-useful images (overlap {overlap:.2f})")
        ax.legend()
        fig.tight_layout()
        path = out / "brisque_overlap.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        files.append(path)
        lines += [
            "",
            "## BRISQUE of useful vs non-useful images (the paper's Fig. 1)",
            "",
            f"Histogram overlap Σ min(p, q) = {overlap:.2f} (1 = the same distribution); medians "
            f"{np.median(useful):.1f} (useful) vs {np.median(useless):.1f} (non-useful). "
            "![BRISQUE overlap](brisque_overlap.png)",
        ]
    if runs:
        fig, axes = plt.subplots(1, len(TESTS), figsize=(4 * len(TESTS), 3.5), sharey=True)
        width = 0.8 / len(METHODS)
        for ax, (key, title) in zip(np.atleast_1d(axes), TESTS, strict=True):
            for m_index, method in enumerate(METHODS):
                means = []
                for labeling in labelings:
                    values = [
                        r["accuracy"].get(method, {}).get(key)
                        for r in runs
                        if r["labeling"] == labeling
                    ]
                    clean = [v for v in values if v is not None and not math.isnan(v)]
                    means.append(np.mean(clean) if clean else np.nan)
                ax.bar(np.arange(len(labelings)) + m_index * width, means, width, label=method)
            ax.set_xticks(np.arange(len(labelings)) + 0.4 - width / 2)
            ax.set_xticklabels(labelings, rotation=20, fontsize=8)
            ax.set_title(title)
            ax.set_ylim(0, 1)
        np.atleast_1d(axes)[0].set_ylabel("accuracy")
        np.atleast_1d(axes)[-1].legend(fontsize=7)
        fig.tight_layout()
        path = out / "accuracy.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        files.append(path)
        lines += ["", "![accuracy](accuracy.png)"]
    if filter_rows:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        keys = ("map_all", "map_predictor", "map_random", "map_true_labels")
        values = [
            [row[k] for row in filter_rows if row[k] is not None and not math.isnan(row[k])]
            for k in keys
        ]
        ax.bar(keys, [np.mean(v) if v else np.nan for v in values])
        ax.set_ylabel("mAP@0.5 (mean over dataset × seed)")
        ax.set_title("unused detector after filtering")
        fig.tight_layout()
        path = out / "filtering.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        files.append(path)
        lines += ["", "![filtering](filtering.png)"]
    labels_csv = write_labels_csv(out / "labels.csv", items, labelings)
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return [report, labels_csv, *files]


def write_labels_csv(path: Path, items: Sequence[Any], labelings: Sequence[str]) -> Path:
    """Every distorted image's labels: per detector binary / Eq. (2) as printed / clipped, and
    the vote with the detectors' mean graded and clipped utility (empty = undefined)."""
    import csv

    def cell(value: Any) -> Any:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        return round(value, 4) if isinstance(value, float) else value

    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        header = ["dataset", "source", "distortion", "group"]
        for labeling in labelings:
            header += [f"{labeling}_label", f"{labeling}_graded", f"{labeling}_clipped"]
        writer.writerow(header)
        for item in items:
            row = [item.dataset, item.source, item.distortion, item.group]
            for labeling in labelings:
                row += [
                    cell(item.labels[labeling]),
                    cell(item.graded[labeling]),
                    cell(item.clipped[labeling]),
                ]
            writer.writerow(row)
    return path
