"""``boxloop bench search``: compositional sketch search on the shared subsets, as in the paper.

Per seed: the search sets' images (COCO mini, VOC2012, KITTI tiny) are split into training and
held-out images; a search model is trained on the training images' boxes (crops stand in for
sketches) and half of the Quick, Draw! sketches of each class; queries are made from held-out
images' ground-truth boxes, the n = 1, 2, 3 largest boxes of classes with a sketch, each with a
held-out sketch of its class placed in the box. Every query searches the whole collection (all
five sets, raccoon and BCCD as distractors; training images included, as in a labeling pool).

Methods: ``boxloop`` (sketches + layout, exact search on E), ``boxloop (index space)`` (the same
after the PCA to the index's dimensions: what the product's index holds, exact search),
``boxloop (compact index)`` (the index space through OPQ + IVF8 + PQ16 + residual PQ16 re-rank, forced on
this small collection, nprobe 4 of 8 lists), ``boxloop, crops-only training (paper)`` (f_t
trained on crop embeddings only, ``sketch_mix = 0``, as the paper),
``class names + layout`` (SemIR-like: class embeddings painted, same f_t), ``single object``
(mSBIR-like: the mean of the objects' f_s against f_i of whole images, no layout), ``random``.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from backend.search import (
    CompactIndex,
    IndexConfig,
    QueryEncoder,
    QueryObject,
    SearchQuery,
    SketchSet,
    TrainConfig,
    TrainImage,
    train_search_model,
)
from backend.search.backbone import pooled_extractor
from backend.search.sketch import strokes_into_box
from benchmark.search_data import SearchData, load_search_data
from benchmark.search_metrics import (
    D_DEFINITION,
    average_precision_at_k,
    ndcg_at_k,
    precision_at_k,
    relevance,
)

__all__ = ["QUICK", "SearchBenchConfig", "run_search_bench", "write_report"]

METHODS = (
    "boxloop",
    "boxloop (index space)",
    "boxloop (compact index)",
    "boxloop, crops-only training (paper)",
    "class names + layout",
    "single object",
    "random",
)
OBJECT_COUNTS = (1, 2, 3)
DEFAULT_OUT = Path("benchmark/results/search")


@dataclass(frozen=True)
class SearchBenchConfig:
    seeds: tuple[int, ...] = (0, 1, 2)
    holdout: float = 0.3
    k: int = 200
    p_k: int = 20
    tau: float = 0.5
    min_box_area: float = 0.01
    train: TrainConfig = field(default_factory=TrainConfig)
    max_images_per_set: int | None = None
    sketches_per_class: int = 25
    quick: bool = False
    num_threads: int = 2
    out: Path = DEFAULT_OUT


def _queries(
    data: SearchData,
    held_out: np.ndarray,
    query_sketches: dict[int, np.ndarray],
    rng: np.random.Generator,
    min_area: float,
) -> list[tuple[int, SearchQuery, SearchQuery, np.ndarray, np.ndarray]]:
    """(n, sketch query, class-name query, boxes, labels) per held-out image and object count."""
    out = []
    for i in held_out:
        boxes, labels = data.boxes[i], data.box_labels[i]
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        ok = [
            j for j in np.argsort(-area) if area[j] >= min_area and int(labels[j]) in query_sketches
        ]
        for n in OBJECT_COUNTS:
            if len(ok) < n:
                continue
            pick = ok[:n]
            sketch_objs, class_objs = [], []
            for j in pick:
                box = tuple(float(v) for v in boxes[j])
                label = data.labels[int(labels[j])]
                s = int(rng.choice(query_sketches[int(labels[j])]))
                strokes = strokes_into_box(data.sketch_strokes[s], box)  # type: ignore[arg-type]
                sketch_objs.append(QueryObject(box, label, strokes))  # type: ignore[arg-type]
                class_objs.append(QueryObject(box, label))  # type: ignore[arg-type]
            out.append(
                (
                    n,
                    SearchQuery(tuple(sketch_objs)),
                    SearchQuery(tuple(class_objs)),
                    boxes[pick],
                    labels[pick],
                )
            )
    return out


COMPACT_FACTORY = "OPQ16_{d},IVF8,PQ16+16"  # the product's large-pool factory, 8 lists
COMPACT_NPROBE = 4


def _compact_rank(index: CompactIndex, query: np.ndarray, k: int) -> np.ndarray:
    """The compact index's top k (row ids = image indices); may hold fewer than k."""
    return index.search(query, k)[0].ids


def _rank(vectors: np.ndarray, query: np.ndarray) -> np.ndarray:
    return np.argsort(-(vectors @ query.reshape(-1)), kind="stable")


def run_seed(data: SearchData, seed: int, config: SearchBenchConfig) -> dict[str, Any]:
    """Train on one split, query the held-out images, return per-query metrics by method."""
    rng = np.random.default_rng(seed)
    search = np.asarray(
        [i for i, r in enumerate(data.image_role) if r == "search" and len(data.boxes[i])]
    )
    perm = rng.permutation(search)
    n_held = round(config.holdout * len(perm))
    held_out, train_idx = np.sort(perm[:n_held]), np.sort(perm[n_held:])
    train_sketch, query_sketches = [], defaultdict(list)
    for c in np.unique(data.sketch_labels):
        idx = rng.permutation(np.flatnonzero(data.sketch_labels == c))
        half = len(idx) // 2
        train_sketch += list(idx[:half])
        query_sketches[int(c)] = list(idx[half:])
    train_sketch_arr = np.asarray(sorted(train_sketch))
    images = [
        TrainImage(data.maps[i], data.boxes[i], data.box_labels[i], data.crops[i])
        for i in train_idx
    ]
    sketches = SketchSet(
        data.sketch_features[train_sketch_arr], data.sketch_labels[train_sketch_arr]
    )
    started = time.perf_counter()
    model = train_search_model(data.labels, images, sketches, replace(config.train, seed=seed))
    train_s = time.perf_counter() - started
    # the paper's training: f_t sees crop embeddings only (sketch_mix = 0)
    paper = train_search_model(
        data.labels, images, sketches, replace(config.train, seed=seed, sketch_mix=0.0)
    )
    e_paper = paper.encode_maps(data.maps)
    paper_encoder = QueryEncoder(
        paper, pooled_extractor(config.out / "cache" / "onnx", num_threads=config.num_threads)
    )

    e_full = model.encode_maps(data.maps)
    e_index = model.reduce(e_full)
    f_whole = model.crop_embeddings(data.pooled)
    # The product's compact index, forced on this small collection (the product searches pools
    # under 50k exactly): OPQ + IVF with 8 lists, 16-byte PQ, residual PQ16 re-rank store, nprobe 4.
    compact = None
    if len(e_index) >= 256:  # PQ needs at least 256 training vectors (not so in --quick)
        compact = CompactIndex.build(
            e_index,
            config=IndexConfig(flat_below=1, nprobe=COMPACT_NPROBE, rerank=config.k, num_threads=1),
            factory=COMPACT_FACTORY.format(d=e_index.shape[1]),
        )
    encoder = QueryEncoder(
        model, pooled_extractor(config.out / "cache" / "onnx", num_threads=config.num_threads)
    )
    queries = _queries(
        data,
        held_out,
        {c: np.asarray(v) for c, v in query_sketches.items()},
        rng,
        config.min_box_area,
    )
    per_query: list[dict[str, Any]] = []
    started = time.perf_counter()
    for n, sketch_q, class_q, q_boxes, q_labels in queries:
        rel = relevance(q_boxes, q_labels, data.boxes, data.box_labels)
        e_q = encoder.encode(sketch_q)
        obj = encoder.object_embeddings(sketch_q)
        single = obj.mean(0)
        single /= max(float(np.linalg.norm(single)), 1e-12)
        rankings = {
            "boxloop": _rank(e_full, e_q),
            "boxloop (index space)": _rank(e_index, model.reduce(e_q)),
            "boxloop (compact index)": (
                None if compact is None else _compact_rank(compact, model.reduce(e_q), config.k)
            ),
            "boxloop, crops-only training (paper)": _rank(e_paper, paper_encoder.encode(sketch_q)),
            "class names + layout": _rank(e_full, encoder.encode(class_q)),
            "single object": _rank(f_whole, single),
            "random": rng.permutation(len(data)),
        }
        row: dict[str, Any] = {"n": n, "relevant": int((rel > config.tau).sum())}
        for method, ranking in rankings.items():
            if ranking is None:
                continue
            row[method] = {
                "ap": average_precision_at_k(ranking, rel, config.k, config.tau),
                "ndcg": ndcg_at_k(ranking, rel, config.k, config.tau),
                "p": precision_at_k(ranking, rel, config.p_k, config.tau),
            }
        per_query.append(row)
    return {
        "seed": seed,
        "train_images": len(train_idx),
        "held_out_images": len(held_out),
        "train_seconds": round(train_s, 1),
        "query_seconds": round(time.perf_counter() - started, 1),
        "model_meta": model.meta,
        "queries": per_query,
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """mean ± sd over seeds of each seed's mean over queries, per method, metric and n."""
    table: dict[str, Any] = {}
    counts: dict[str, Any] = {}
    for n in OBJECT_COUNTS:
        key = str(n)
        per_seed_queries = [[q for q in run["queries"] if q["n"] == n] for run in runs]
        counts[key] = {
            "queries_per_seed": [len(qs) for qs in per_seed_queries],
            "without_relevant_per_seed": [
                sum(1 for q in qs if q["relevant"] == 0) for qs in per_seed_queries
            ],
        }
        for method in METHODS:
            for metric in ("ap", "ndcg", "p"):
                seed_means = []
                for qs in per_seed_queries:
                    values = [
                        q[method][metric]
                        for q in qs
                        if method in q and not math.isnan(q[method][metric])
                    ]
                    if values:
                        seed_means.append(float(np.mean(values)))
                cell = table.setdefault(method, {}).setdefault(metric, {})
                cell[key] = {
                    "mean": float(np.mean(seed_means)) if seed_means else None,
                    "sd": float(np.std(seed_means, ddof=1)) if len(seed_means) > 1 else None,
                    "seeds": seed_means,
                }
    return {"table": table, "counts": counts}


def _fmt(cell: dict[str, Any]) -> str:
    if cell["mean"] is None:
        return "–"
    sd = f" ± {cell['sd']:.3f}" if cell["sd"] is not None else ""
    return f"{cell['mean']:.3f}{sd}"


_METRIC_TITLES = {
    "ap": "mAP@{k} (binary relevance R > τ)",
    "ndcg": "NDCG@{k} (graded relevance, ideal DCG over the whole collection)",
    "p": "P@{p_k}",
}


def write_report(out: Path, config: SearchBenchConfig, runs: list[dict[str, Any]]) -> list[Path]:
    """results.json, README.md (tables) and plots into ``out``."""
    summary = summarize(runs)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [r["seed"] for r in runs]
    result = {
        "config": {**asdict(config), "out": str(config.out)},
        "seeds": seeds,
        "summary": summary,
        "runs": [{k: v for k, v in r.items() if k != "queries"} for r in runs],
        "machine": {"python": sys.version.split()[0], "platform": platform.platform()},
    }
    files = [out / "results.json"]
    files[0].write_text(json.dumps(result, indent=2, default=str) + "\n")
    lines = [
        "# Compositional sketch search on the shared subsets",
        "",
        f"Command: `boxloop bench search{' --quick' if config.quick else ''}` · seeds {seeds} · "
        f"τ = {config.tau} · K = {config.k} · mean ± sd over seeds of each seed's mean over "
        "queries.",
        "",
        "Collection: COCO mini + VOC2012 (70) + KITTI tiny searched together, raccoon and BCCD "
        f"as distractors ({runs[0]['train_images'] + runs[0]['held_out_images']} search images "
        "with boxes; every image of the five sets is in the collection). Queries: held-out "
        "images' n largest boxes (area ≥ 1 %) of classes with a sketch, a held-out Quick, Draw! "
        "sketch of the class in each box. A query's own image is in the collection (as in the "
        "paper, whose queries come from its test set), so every query has a relevant image.",
        "",
    ]
    for metric in ("ap", "ndcg", "p"):
        lines += [
            f"## {_METRIC_TITLES[metric].format(k=config.k, p_k=config.p_k)}",
            "",
            "| method | 1 object | 2 objects | 3 objects |",
            "|---|---|---|---|",
        ]
        for method in METHODS:
            cells = [_fmt(summary["table"][method][metric][str(n)]) for n in OBJECT_COUNTS]
            lines.append(f"| {method} | {' | '.join(cells)} |")
        lines += ["", f"D: {D_DEFINITION}", ""]
    lines += [
        "## Queries",
        "",
        "| objects | queries per seed | with no relevant image (left out) |",
        "|---|---|---|",
    ]
    for n in OBJECT_COUNTS:
        c = summary["counts"][str(n)]
        lines.append(f"| {n} | {c['queries_per_seed']} | {c['without_relevant_per_seed']} |")
    lines += [
        "",
        "## Training",
        "",
        "| seed | train images | held-out | train s | f_t loss first → last |",
        "|---|---|---|---|---|",
    ]
    for r in runs:
        loss = r["model_meta"].get("spatial_loss") or [float("nan")]
        lines.append(
            f"| {r['seed']} | {r['train_images']} | {r['held_out_images']} | "
            f"{r['train_seconds']} | {loss[0]:.3f} → {loss[-1]:.3f} |"
        )
    lines.append("")
    files.append(out / "README.md")
    files[-1].write_text("\n".join(lines))
    files += _plots(out, summary, config)
    return files


def _plots(out: Path, summary: dict[str, Any], config: SearchBenchConfig) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    width = 0.8 / len(METHODS)
    for ax, metric in zip(axes, ("ap", "ndcg", "p"), strict=True):
        for m, method in enumerate(METHODS):
            cells = [summary["table"][method][metric][str(n)] for n in OBJECT_COUNTS]
            means = [c["mean"] if c["mean"] is not None else 0.0 for c in cells]
            sds = [c["sd"] or 0.0 for c in cells]
            xs = np.arange(len(OBJECT_COUNTS)) + (m - len(METHODS) / 2 + 0.5) * width
            ax.bar(xs, means, width, yerr=sds, label=method, capsize=2)
        ax.set_xticks(np.arange(len(OBJECT_COUNTS)), [f"{n} obj" for n in OBJECT_COUNTS])
        ax.set_title(_METRIC_TITLES[metric].format(k=config.k, p_k=config.p_k).split(" (")[0])
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = out / "search_metrics.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def run_search_bench(config: SearchBenchConfig) -> list[Path]:
    import torch

    torch.set_num_threads(max(1, config.num_threads))
    data = load_search_data(
        cache_dir=config.out / "cache",
        max_images_per_set=config.max_images_per_set,
        sketches_per_class=config.sketches_per_class,
        num_threads=config.num_threads,
    )
    runs = []
    for seed in config.seeds:
        run = run_seed(data, seed, config)
        (config.out / "runs").mkdir(parents=True, exist_ok=True)
        (config.out / "runs" / f"seed{seed}.json").write_text(json.dumps(run, default=str) + "\n")
        runs.append(run)
        print(f"seed {seed}: trained in {run['train_seconds']} s, {len(run['queries'])} queries")
    return write_report(config.out, config, runs)


#: What ``--quick`` changes: capped sets, fewer sketches, short training, one seed.
QUICK = {"max_images_per_set": 24, "sketches_per_class": 6, "seeds": (0,)}
QUICK_OBJECT_STEPS = 300
QUICK_SPATIAL_EPOCHS = 60
