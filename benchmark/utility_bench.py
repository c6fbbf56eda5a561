"""``boxloop bench utility``: image utility for machines on the shared COCO, VOC and KITTI subsets.

What it measures (the paper's Table II, Fig. 1, Fig. 2b / Table IV, with ``docs/method-notes``'s
leak closed):

1. **Labels.** Every source image is distorted by JPEG at the training qualities, by JPEG at
   held-out qualities (for the filtering test) and by a second distortion never used in
   training (Gaussian blur by default). Each labeling detector (the COCO YOLOX-Nano at two input
   sizes, :mod:`backend.utility.labelers`) gives a utility label per distorted image; the combined
   label is the all-agree vote.
2. **Predictor vs baselines** per labeling (each detector alone, and the vote), 3 seeds, each a
   different 80/20 split by *source image*: the Lite0 predictor trained with class-balanced CE on
   decoded pixels; the quantization-table quality, Laplacian variance and BRISQUE, each threshold
   tuned on the training split; the random filter at the predictor's drop rate. Accuracy on the
   JPEG test, on the same test images re-encoded as PNG, and on the unseen distortion, with a 95 %
   cluster-bootstrap interval (resampling source images) on predictor − best baseline.
3. **Filtering**: the mAP of a detector that labeled nothing (YOLOX-Nano at a third input size) on
   the test sources' held-out-quality JPEGs, all kept, after dropping the images the predictor
   calls non-useful, and after dropping as many at random.
4. **BRISQUE overlap** of useful and non-useful images (Fig. 1).

Stage 1 (:mod:`benchmark.utility_labels`: distort, detect, label, score baselines, cache the
predictor's trunk maps) runs once and is cached in ``OUT/cache/items.pkl``; the seeds reuse it.
The configuration is :mod:`benchmark.utility_config`.
"""

from __future__ import annotations

import json
import math
import pickle
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backend.boxes import Boxes, IgnoreOverlap
from backend.scoring import evaluate_map
from backend.utility.baselines import (
    RandomFilter,
    ThresholdRule,
)
from backend.utility.predictor import (
    UtilityNet,
    export_predictor,
    train_top,
)
from benchmark.utility_config import BASELINES, COMBINED, UtilityBenchConfig
from benchmark.utility_labels import Item, build_items, labeler_name, load_datasets

__all__ = [
    "SplitPredictions",
    "cluster_bootstrap",
    "run_utility_bench",
    "source_folds",
    "split_sources",
    "summarize_labeling",
]


# ---------------------------------------------------------------------------------- stage 2
def split_sources(items: Sequence[Item], test_fraction: float, seed: int) -> set[tuple[str, str]]:
    """Test sources: ``test_fraction`` of each dataset's source images, at random by ``seed``."""
    rng = np.random.default_rng(seed)
    test: set[tuple[str, str]] = set()
    for dataset, sources in sorted(_sources_by_dataset(items).items()):
        count = max(1, round(test_fraction * len(sources)))
        for index in rng.permutation(len(sources))[:count]:
            test.add((dataset, sources[int(index)]))
    return test


def source_folds(items: Sequence[Item], folds: int, seed: int) -> list[set[tuple[str, str]]]:
    """The test sources of each of ``folds`` folds: each dataset's source images permuted by
    ``seed`` and dealt round-robin, so every source is in exactly one fold and each fold holds
    about ``1/folds`` of every dataset."""
    rng = np.random.default_rng(seed)
    parts: list[set[tuple[str, str]]] = [set() for _ in range(folds)]
    for dataset, sources in sorted(_sources_by_dataset(items).items()):
        for rank, index in enumerate(rng.permutation(len(sources))):
            parts[rank % folds].add((dataset, sources[int(index)]))
    return parts


def _sources_by_dataset(items: Sequence[Item]) -> dict[str, list[str]]:
    by_dataset: dict[str, list[str]] = {}
    for item in items:
        sources = by_dataset.setdefault(item.dataset, [])
        if not sources or sources[-1] != item.source:  # items come grouped by source
            sources.append(item.source)
    return by_dataset


def cluster_bootstrap(
    correct_a: np.ndarray, correct_b: np.ndarray, clusters: np.ndarray, n: int, seed: int
) -> tuple[float, float, float]:
    """Mean of ``a − b`` (per-image correctness) and its 95 % interval, resampling clusters
    (source images: the distorted copies of one photo are not independent)."""
    diff = np.asarray(correct_a, np.float64) - np.asarray(correct_b, np.float64)
    if not len(diff):
        return float("nan"), float("nan"), float("nan")
    keys, index = np.unique(clusters, return_inverse=True)
    sums = np.bincount(index, weights=diff, minlength=len(keys))
    counts = np.bincount(index, minlength=len(keys)).astype(np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(keys), (n, len(keys)))
    stats = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    low, high = np.percentile(stats, [2.5, 97.5])
    return float(diff.mean()), float(low), float(high)


def _share(truths: np.ndarray) -> float:
    """Share of useful (1) items; NaN for an empty test (no items to take a share of)."""
    return float(truths.mean()) if len(truths) else float("nan")


def _accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    return float((pred == truth).mean()) if len(truth) else float("nan")


TESTS_KEYS = ("jpeg", "png", "unseen")


@dataclass
class SplitPredictions:
    """One split's test outcome for a labeling: per test (``jpeg``, ``png``, ``unseen``), each
    method's 0/1 correctness per test item, the truths and the items' source images."""

    truths: dict[str, np.ndarray]
    correct: dict[str, dict[str, np.ndarray]]  # method → test → 0/1 per item
    clusters: dict[str, np.ndarray]
    predictor_jpeg: np.ndarray  # the predictor's 0/1 on the JPEG test (its drop rate)

    @classmethod
    def pooled(cls, parts: Sequence[SplitPredictions]) -> SplitPredictions:
        """The folds' predictions as one test set (each source tested once, by its fold)."""

        def cat(arrays: list[np.ndarray]) -> np.ndarray:
            return np.concatenate(arrays) if arrays else np.zeros(0)

        first = parts[0]
        return cls(
            truths={k: cat([p.truths[k] for p in parts]) for k in first.truths},
            correct={
                m: {k: cat([p.correct[m][k] for p in parts]) for k in tests}
                for m, tests in first.correct.items()
            },
            clusters={k: cat([p.clusters[k] for p in parts]) for k in first.clusters},
            predictor_jpeg=cat([p.predictor_jpeg for p in parts]),
        )


def fit_labeling(
    items: Sequence[Item],
    labeling: str,
    test: set[tuple[str, str]],
    seed: int,
    config: UtilityBenchConfig,
) -> tuple[dict[str, Any], UtilityNet | None, SplitPredictions | None]:
    """Train the predictor and tune the baselines on the sources outside ``test``, and predict
    the test sources: ``(facts, net, predictions)``; net and predictions are None when the
    training split lacks a class or the test split is empty."""

    def pick(group: str, in_test: bool) -> list[Item]:
        return [
            i
            for i in items
            if i.group == group
            and i.labels[labeling] is not None
            and ((i.dataset, i.source) in test) == in_test
        ]

    train, test_items, unseen = pick("train", False), pick("train", True), pick("unseen", True)
    y_train = np.array([i.labels[labeling] for i in train], np.int64)
    y_test = np.array([i.labels[labeling] for i in test_items], np.int64)
    y_unseen = np.array([i.labels[labeling] for i in unseen], np.int64)
    facts: dict[str, Any] = {
        "labeling": labeling,
        "seed": seed,
        "train": len(train),
        "test": len(test_items),
        "unseen": len(unseen),
        "train_useful_share": float(y_train.mean()) if len(y_train) else float("nan"),
        "test_useful_share": float(y_test.mean()) if len(y_test) else float("nan"),
        # the unseen test's own base rate: its accuracies read against this, not the JPEG one
        "unseen_useful_share": _share(y_unseen),
        # over every item of the labeling's JPEG group (train + test: the same for any split)
        "graded_mean": float(np.nanmean([i.graded[labeling] for i in train + test_items])),
        "clipped_mean": float(np.nanmean([i.clipped[labeling] for i in train + test_items])),
    }
    if len(set(y_train.tolist())) < 2 or not len(y_test):
        facts["skipped"] = "the training split lacks one class or the test split is empty"
        return facts, None, None
    pconfig = replace(config.predictor, seed=seed, threads=config.threads)
    maps = np.stack([i.maps for i in train])
    net, history = train_top(maps, y_train, pconfig)
    facts["train_seconds"] = round(history.seconds, 1)
    facts["train_loss"] = history.loss

    predictions = {
        "jpeg": _top_predict(net, test_items),
        "png": _top_predict(net, test_items, png=True),
        "unseen": _top_predict(net, unseen),
    }
    truths = {"jpeg": y_test, "png": y_test, "unseen": y_unseen}
    correct: dict[str, dict[str, np.ndarray]] = {
        "predictor": {k: (p == truths[k]).astype(np.float64) for k, p in predictions.items()}
    }
    rules: dict[str, Any] = {}
    for name in BASELINES:
        rule = ThresholdRule.fit(np.array([i.scores[name] for i in train]), y_train)
        rules[name] = asdict(rule)
        correct[name] = {}
        for key, chosen, use_png in (
            ("jpeg", test_items, False),
            ("png", test_items, True),
            ("unseen", unseen, False),
        ):
            values = np.array([(i.png_scores if use_png else i.scores)[name] for i in chosen])
            pred = rule.predict(values) if len(chosen) else np.zeros(0, np.int64)
            correct[name][key] = (pred == truths[key]).astype(np.float64)
    facts["rules"] = rules
    clusters = {
        "jpeg": np.array([f"{i.dataset}/{i.source}" for i in test_items]),
        "png": np.array([f"{i.dataset}/{i.source}" for i in test_items]),
        "unseen": np.array([f"{i.dataset}/{i.source}" for i in unseen]),
    }
    return facts, net, SplitPredictions(truths, correct, clusters, predictions["jpeg"])


def summarize_labeling(
    facts: dict[str, Any], predictions: SplitPredictions, seed: int, config: UtilityBenchConfig
) -> dict[str, Any]:
    """Accuracy of every method on every test, the random filter at the predictor's drop rate,
    and the cluster-bootstrap interval on predictor − best baseline (best on that test)."""
    accuracy: dict[str, dict[str, float]] = {
        method: {key: float(v.mean()) if len(v) else float("nan") for key, v in tests.items()}
        for method, tests in predictions.correct.items()
    }
    y_test = predictions.truths["jpeg"]
    drop = float((predictions.predictor_jpeg == 0).mean())
    random_pred = RandomFilter(drop, seed=seed).predict(len(y_test))
    accuracy["random"] = {"jpeg": _accuracy(random_pred, y_test)}
    intervals = {}
    for key in TESTS_KEYS:
        best_here = max(BASELINES, key=lambda b: accuracy[b][key])
        mean, low, high = cluster_bootstrap(
            predictions.correct["predictor"][key],
            predictions.correct[best_here][key],
            predictions.clusters[key],
            config.bootstrap,
            seed,
        )
        intervals[key] = {"vs": best_here, "diff": mean, "low": low, "high": high}
    return {
        **facts,
        "accuracy": accuracy,
        "best_baseline": max(BASELINES, key=lambda b: accuracy[b]["jpeg"]),
        "predictor_drop_rate": drop,
        "difference": intervals,
    }


def evaluate_labeling(
    items: Sequence[Item],
    labeling: str,
    test: set[tuple[str, str]],
    seed: int,
    config: UtilityBenchConfig,
    model_dir: Path,
) -> tuple[dict[str, Any], UtilityNet | None]:
    """Train and test the predictor and the baselines for one labeling on one split."""
    facts, net, predictions = fit_labeling(items, labeling, test, seed, config)
    if net is None or predictions is None:
        return facts, None
    if labeling == COMBINED:
        export_predictor(
            net,
            model_dir / f"{labeling}_seed{seed}.onnx",
            size=config.predictor.size,
            view=config.predictor.view,
        )
    return summarize_labeling(facts, predictions, seed, config), net


def evaluate_labeling_folds(
    items: Sequence[Item],
    labeling: str,
    folds: Sequence[set[tuple[str, str]]],
    seed: int,
    config: UtilityBenchConfig,
) -> tuple[dict[str, Any], list[tuple[set[tuple[str, str]], UtilityNet]]]:
    """k-fold cross-validation over sources: one predictor per fold, the folds' test
    predictions pooled, then summarised as one split (each source tested once)."""
    parts: list[SplitPredictions] = []
    nets: list[tuple[set[tuple[str, str]], UtilityNet]] = []
    per_fold: list[dict[str, Any]] = []
    for test in folds:
        facts, net, predictions = fit_labeling(items, labeling, test, seed, config)
        per_fold.append(facts)
        if net is None or predictions is None:
            continue
        parts.append(predictions)
        nets.append((test, net))
    if not parts:
        return {**per_fold[0], "skipped": "no fold could be trained"}, []
    predictions = SplitPredictions.pooled(parts)
    pooled = {
        "labeling": labeling,
        "seed": seed,
        "folds": len(folds),
        "train": round(float(np.mean([f["train"] for f in per_fold]))),
        "test": sum(f["test"] for f in per_fold if "skipped" not in f),
        "unseen": sum(f["unseen"] for f in per_fold if "skipped" not in f),
        "train_useful_share": float(np.mean([f["train_useful_share"] for f in per_fold])),
        "test_useful_share": float(predictions.truths["jpeg"].mean()),
        "unseen_useful_share": _share(predictions.truths["unseen"]),
        "graded_mean": per_fold[0]["graded_mean"],
        "clipped_mean": per_fold[0]["clipped_mean"],
        "train_seconds": round(sum(f.get("train_seconds", 0.0) for f in per_fold), 1),
        "folds_skipped": sum("skipped" in f for f in per_fold),
        "rules": [f.get("rules") for f in per_fold],
    }
    return summarize_labeling(pooled, predictions, seed, config), nets


def filtering(
    items: Sequence[Item],
    test: set[tuple[str, str]],
    net_predict: Any,
    seed: int,
    repeats: int,
    dataset_labels: dict[str, tuple[list[str], IgnoreOverlap]],
) -> dict[str, Any]:
    """mAP@0.5 of the unused detector on the test sources' held-out JPEGs: all, after the
    predictor's filter, after a random filter of the same size (mean of ``repeats`` draws), and
    after the true-label filter (an upper reference). Averaged over datasets."""
    rows: dict[str, Any] = {}
    rng = np.random.default_rng(seed)
    for dataset, (labels, overlap) in sorted(dataset_labels.items()):
        chosen = [
            i
            for i in items
            if i.group == "heldout" and i.dataset == dataset and (i.dataset, i.source) in test
        ]
        if not chosen:
            continue
        gts = [i.gt for i in chosen]
        preds = [i.unused for i in chosen]
        keep = net_predict(chosen) == 1
        truth = np.array([i.labels[COMBINED] for i in chosen], dtype=object)

        def m(
            mask: np.ndarray,
            gts: list[Boxes] = gts,
            preds: list[Any] = preds,
            labels: list[str] = labels,
            overlap: IgnoreOverlap = overlap,
        ) -> float:
            if not mask.any():
                return float("nan")
            idx = np.flatnonzero(mask)
            chosen_gts, chosen_preds = [gts[k] for k in idx], [preds[k] for k in idx]
            return evaluate_map(chosen_gts, chosen_preds, labels, overlap).map50

        random_maps = []
        for _ in range(repeats):
            mask = np.zeros(len(chosen), bool)
            mask[rng.permutation(len(chosen))[: int(keep.sum())]] = True
            random_maps.append(m(mask))
        oracle = np.array([t != 0 for t in truth])
        rows[dataset] = {
            "images": len(chosen),
            "kept": int(keep.sum()),
            "map_all": m(np.ones(len(chosen), bool)),
            "map_predictor": m(keep),
            "map_random": float(np.nanmean(random_maps)) if random_maps else float("nan"),
            "map_random_sd": float(np.nanstd(random_maps)) if random_maps else float("nan"),
            "map_true_labels": m(oracle),
        }
    return rows


def run_utility_bench(
    config: UtilityBenchConfig, *, force: bool = False, progress: bool = True
) -> tuple[dict[str, Any], list[Path]]:
    """Run every stage, write ``results.json``, ``report.md`` and plots under ``config.output``."""
    out = Path(config.output)
    cache_dir = out / "cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache = cache_dir / "items.pkl"
    key = json.dumps(
        {
            k: v
            for k, v in config.to_dict().items()
            if k not in ("seeds", "bootstrap", "output", "folds")  # stage 2 only
        },
        sort_keys=True,
        default=str,
    )
    start = time.perf_counter()
    items: list[Item] | None = None
    facts: dict[str, Any] = {}
    if cache.is_file() and not force:
        try:
            with cache.open("rb") as fh:
                stored = pickle.load(fh)
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as exc:
            # cut short, or written by older code (its classes lived elsewhere): build anew
            print(f"stage 1 cache {cache} is unreadable ({type(exc).__name__}): rebuilding it")
            stored = {}
        if stored.get("key") == key:
            items, facts = stored["items"], stored["facts"]
    if items is None:
        items, facts = build_items(config, cache_dir, progress)
        with cache.open("wb") as fh:
            pickle.dump({"key": key, "items": items, "facts": facts}, fh)
    facts["stage1_total_seconds"] = round(time.perf_counter() - start, 1)
    labelings = [labeler_name(s) for s in config.labelers] + [COMBINED]
    dataset_labels = {d.name: (list(d.labels), d.ignore_overlap) for d in load_datasets(config)}
    runs: list[dict[str, Any]] = []
    model_dir = out / "models"
    model_dir.mkdir(parents=True, exist_ok=True)
    from benchmark.utility_report import write_utility_report

    label_stats = _label_stats(items, labelings)
    files: list[Path] = []
    summary: dict[str, Any] = {}
    for seed in config.seeds:
        # the vote first: it also drives the filtering test, the most expensive row to lose
        for labeling in [COMBINED, *labelings[:-1]]:
            result, fold_nets = _evaluate_seed(items, labeling, seed, config, model_dir)
            if labeling == COMBINED and fold_nets:
                result["filtering"] = filtering(
                    items,
                    set().union(*(test for test, _ in fold_nets)),
                    lambda chosen, nets=fold_nets: _fold_predict(nets, chosen),
                    seed,
                    config.random_repeats,
                    dataset_labels,
                )
            runs.append(result)
            if progress:
                acc = result.get("accuracy", {}).get("predictor", {})
                print(f"seed {seed} {labeling}: {json.dumps(acc)}", flush=True)
        # results so far after every seed: a run stopped early still leaves its finished seeds
        runs.sort(key=lambda r: (r["seed"], labelings.index(r["labeling"])))
        summary = {
            "config": config.to_dict(),
            "facts": facts,
            "labels": label_stats,
            "runs": runs,
            "machine": {"python": platform.python_version(), "load": _load_average()},
            "seconds": round(time.perf_counter() - start, 1),
        }
        (out / "results.json").write_text(json.dumps(_jsonable(summary), indent=2))
        files = [out / "results.json", *write_utility_report(out, summary, items)]
    return summary, files


def _evaluate_seed(
    items: Sequence[Item], labeling: str, seed: int, config: UtilityBenchConfig, model_dir: Path
) -> tuple[dict[str, Any], list[tuple[set[tuple[str, str]], UtilityNet]]]:
    """One seed of one labeling: one split, or ``config.folds`` folds pooled. Returns the result
    row and each trained predictor with the test sources it predicts."""
    if not config.folds:
        test = split_sources(items, config.test_fraction, seed)
        result, net = evaluate_labeling(items, labeling, test, seed, config, model_dir)
        return result, [] if net is None else [(test, net)]
    folds = source_folds(items, config.folds, seed)
    result, nets = evaluate_labeling_folds(items, labeling, folds, seed, config)
    if labeling == COMBINED:
        for k, (_, net) in enumerate(nets):
            export_predictor(
                net,
                model_dir / f"{labeling}_seed{seed}_fold{k}.onnx",
                size=config.predictor.size,
                view=config.predictor.view,
            )
    return result, nets


def _fold_predict(
    nets: Sequence[tuple[set[tuple[str, str]], UtilityNet]], chosen: Sequence[Item]
) -> np.ndarray:
    """Each item predicted by the predictor whose test sources hold it."""
    out = np.zeros(len(chosen), np.int64)
    for test, net in nets:
        index = [k for k, i in enumerate(chosen) if (i.dataset, i.source) in test]
        if index:
            out[index] = _top_predict(net, [chosen[k] for k in index])
    return out


def _top_predict(net: UtilityNet, chosen: Sequence[Item], png: bool = False) -> np.ndarray:
    """0/1 from the trained top on cached trunk maps: the same network the exported ONNX file
    runs end to end (``tests/unit/test_utility_predictor.py`` checks ONNX equals eager), without
    decoding every distorted image again."""
    if not chosen:
        return np.zeros(0, np.int64)
    arrays = [i.png_maps if png and i.png_maps is not None else i.maps for i in chosen]
    if png and any(i.png_maps is None for i in chosen):
        raise ValueError("PNG maps exist only for the training-quality group")
    stacked = np.stack(arrays).astype(np.float32)
    with torch.no_grad():
        logits = net.top(torch.from_numpy(stacked))
    return logits.argmax(1).numpy().astype(np.int64)


def _label_stats(items: Sequence[Item], labelings: Sequence[str]) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    for labeling in labelings:
        per_distortion: dict[str, dict[str, int]] = {}
        for item in items:
            row = per_distortion.setdefault(
                item.distortion, {"useful": 0, "useless": 0, "dropped": 0}
            )
            label = item.labels[labeling]
            row["dropped" if label is None else ("useful" if label == 1 else "useless")] += 1
        stats[labeling] = per_distortion
    names = [n for n in labelings if n != COMBINED]
    if len(names) >= 2:
        both = [i for i in items if all(i.labels[n] is not None for n in names)]
        agree = [i for i in both if len({i.labels[n] for n in names}) == 1]
        stats["agreement_between_labelers"] = len(agree) / len(both) if both else float("nan")
    return stats


def _load_average() -> list[float]:
    try:
        import os

        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux
        return []


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, np.floating):
        return _jsonable(float(value))
    if isinstance(value, np.integer):
        return int(value)
    return value
