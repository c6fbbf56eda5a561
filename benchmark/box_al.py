"""``boxloop bench box``: box-level against image-level active learning, mAP against boxes labelled.

The method of Desai & Balasubramanian (fine-grained sampling), replayed on ground truth through
the backend's own parts (:mod:`backend.active`, :func:`backend.training.yolox_train.train_yolox`):

1. a random ``init_fraction`` of the pool is labelled in full (L_I); the COCO YOLOX-Nano,
   its head re-cut to the dataset's labels, is fine-tuned on it: the initial model;
2. each episode the current model predicts the images not labelled in full at ``t_d``
   (the box pool U_B); a *box-level* approach queries the K most informative eligible boxes
   and the simulated annotator answers them with :func:`backend.active.resolve_queries`
   (adjusted to the ground truth of largest IoU ≥ 0.5 with its class, else background); an
   *image-level* approach labels whole images, ranked by the mean of their boxes' measure,
   until it has drawn at least K boxes;
3. the model is retrained on L_I, from the COCO weights or, with ``warm_start``, from the last
   episode's model (as the product's training job continues from the serving version):
   answered boxes weigh 1, the other predicted boxes of partly labelled images weigh λ_d
   (``noisy_weight``);
4. mAP@0.5 on the held-out split after each episode, against the boxes labelled (the paper's
   cost: ground-truth boxes obtained) and the boxes looked at (every query, background ones
   included).

"Fully supervised" is the same training on every pool image labelled in full. K is a fraction
of the pool's object count (``k_fraction``), so every dataset spends the same share per episode.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from backend.active import (
    BoxCampaign,
    BoxPool,
    box_features_at,
    check_measure,
    pool_members,
    predict_pool,
    resolve_queries,
    select_boxes,
    select_images,
)
from backend.boxes import Boxes
from backend.detectors.yolox import YoloxNano, load_coco_yolox_nano
from backend.scoring import evaluate_map
from backend.training.samples import TrainSample
from backend.training.yolox_train import (
    YoloxTrainConfig,
    initial_yolox,
    input_shape_for,
    train_yolox,
)
from benchmark.box_config import BoxBenchConfig
from benchmark.box_report import write_box_report
from benchmark.config import ConfigError, DatasetConfig
from benchmark.datasets.common import expand_path
from benchmark.product_loop import yolox_config
from benchmark.runner import (
    PreparedDataset,
    dataset_duplicates,
    extract_features,
    prepare_dataset,
)

__all__ = ["run_box_bench"]

SCHEMA = "boxloop.box-al/1"
#: Score floor of held-out predictions for mAP (as the grid's held-out curve).
MAP_FLOOR = 0.01
#: Floor of the box pool's predictions, below t_d: :func:`backend.active.pool_members` tops the
#: pool up to K boxes from here while the model's scores are still low.
POOL_FLOOR = 0.01


# ---------------------------------------------------------------------------------- one campaign
@dataclass
class _Data:
    """A prepared dataset as the campaign needs it."""

    labels: list[str]
    pool_images: list[Image.Image]
    pool_truth: list[Boxes]
    test_images: list[Image.Image]
    test_truth: list[Boxes]
    ignore_overlap: Any
    input_hw: tuple[int, int]
    #: ImgNet features of the pool images (image-level core-set only), rows = pool images.
    image_features: np.ndarray | None = None

    @classmethod
    def of(cls, prepared: PreparedDataset, yolox: YoloxTrainConfig) -> _Data:
        """``yolox``: the config the campaign trains with; its input size (area, side bounds)
        sizes the letterbox every model of the campaign trains and predicts at."""
        pool = prepared.pool.samples
        test = prepared.holdout.samples
        images = [prepared.images[s.image_id] for s in pool]
        return cls(
            labels=list(prepared.dataset.labels),
            pool_images=images,
            pool_truth=[s.boxes for s in pool],
            test_images=[prepared.images[s.image_id] for s in test],
            test_truth=[s.boxes for s in test],
            ignore_overlap=prepared.dataset.ignore_overlap,
            input_hw=input_shape_for([im.size for im in images], yolox),
        )


def _held_out_map(model: YoloxNano, data: _Data) -> float:
    pool = predict_pool(
        model, data.test_images, data.input_hw, score_threshold=MAP_FLOOR, with_features=False
    )
    preds = [pool.boxes(pool.rows_of(i), i) for i in range(len(data.test_images))]
    return float(evaluate_map(data.test_truth, preds, data.labels, data.ignore_overlap).map50)


class _Campaign:
    """One approach's campaign from the shared initial state."""

    def __init__(
        self,
        approach: str,
        data: _Data,
        init_images: Sequence[int],
        train: Callable[[list[TrainSample], YoloxNano | None], YoloxNano],
        config: BoxBenchConfig,
        seed: int,
        k: int,
    ) -> None:
        self.level, measure = approach.split(":")
        self.measure = check_measure(measure)
        self.data, self.train, self.config, self.seed, self.k = data, train, config, seed, k
        self.campaign = BoxCampaign([im.size for im in data.pool_images])
        for i in init_images:
            self.campaign.label_fully(i, data.pool_truth[i])

    def episode(self, model: YoloxNano, number: int) -> tuple[YoloxNano, dict[str, Any]]:
        data, campaign = self.data, self.campaign
        open_images = [
            i
            for i in range(len(data.pool_images))
            if i not in campaign.labeled or not campaign.labeled[i].complete
        ]
        pool = predict_pool(
            model,
            [data.pool_images[i] for i in open_images],
            data.input_hw,
            score_threshold=min(self.config.t_d, POOL_FLOOR),
            with_features=self.level == "box" and self.measure == "coreset",
        )
        pool = _reindex(pool, open_images, [im.size for im in data.pool_images])
        pool = pool.subset(
            pool_members(pool, self.config.t_d, self.k, eligible=campaign.eligible(pool))
        )
        seed = self.seed * 1000 + number
        if self.level == "box":
            self._query_boxes(model, pool, seed)
        else:
            self._query_images(pool, open_images, seed)
        samples = campaign.training_samples(
            pool, data.pool_images, self.config.noisy_weight, self.config.background_weight
        )
        new_model = self.train(samples, model if self.config.warm_start else None)
        c = campaign.counts
        record = {
            "episode": number,
            "pool_boxes": len(pool),
            "boxes_labeled": c.boxes_labeled,
            "boxes_looked_at": c.boxes_looked_at,
            "queried": c.queried,
            "confirmed": c.confirmed,
            "adjusted": c.adjusted,
            "duplicate": c.duplicate,
            "background": c.background,
            "ignored": c.ignored,
            "full_image_boxes": c.full_image_boxes,
            "images_in_training": len(campaign.labeled),
            "map50": _held_out_map(new_model, data),
        }
        return new_model, record

    def _query_boxes(self, model: YoloxNano, pool: BoxPool, seed: int) -> None:
        data, campaign = self.data, self.campaign
        labeled_features = None
        if self.measure == "coreset":
            keys = sorted(campaign.labeled)
            feats = box_features_at(
                model,
                [data.pool_images[i] for i in keys],
                [campaign.labeled[i].objects for i in keys],
                data.input_hw,
            )
            labeled_features = np.concatenate(feats) if feats else None
        rows = select_boxes(
            pool,
            self.measure,
            self.k,
            eligible=campaign.eligible(pool),
            labeled_features=labeled_features,
            seed=seed,
        )
        for image in sorted(set(pool.image[rows].tolist())):
            mine = rows[pool.image[rows] == image]
            queries = pool.boxes(mine, image)
            truth = data.pool_truth[image]
            answers = resolve_queries(queries, truth, ignore_overlap=data.ignore_overlap)
            campaign.record_answers(image, queries, answers, truth)

    def _query_images(self, pool: BoxPool, open_images: list[int], seed: int) -> None:
        data, campaign = self.data, self.campaign
        fresh = [i for i in open_images if i not in campaign.labeled]
        ranked = select_images(
            fresh,
            self.measure,
            len(fresh),
            pool=pool,
            n_images=len(data.pool_images),
            image_features=data.image_features,
            labeled_images=sorted(campaign.labeled),
            seed=seed,
        )
        drawn = 0
        for image in ranked.tolist():
            if drawn >= self.k:
                break
            campaign.label_fully(image, data.pool_truth[image])
            drawn += len(data.pool_truth[image].kept())


def _reindex(pool: BoxPool, images: list[int], sizes: list[tuple[int, int]]) -> BoxPool:
    """A pool predicted on ``images`` (a subset) with image indices into the full list."""
    return BoxPool(
        np.asarray(images, np.int64)[pool.image] if len(pool) else pool.image,
        pool.xyxy,
        pool.labels,
        pool.scores,
        pool.class_probs,
        pool.objectness,
        pool.features,
        tuple(sizes),
    )


def run_dataset_seed(
    config: BoxBenchConfig,
    dataset: DatasetConfig,
    seed: int,
    progress: bool = True,
    previous: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every approach of one dataset and seed (the initial model and full supervision shared).

    ``previous``: a stored run of the same run key; only the approaches it lacks run, and its
    fully supervised mAP is kept (the initial model is retrained: training is seeded, so it is
    the same model).
    """
    started = time.perf_counter()
    prepared = prepare_dataset(dataset)
    yolox = yolox_config(config.yolox, seed=seed, threads=config.threads)
    data = _Data.of(prepared, yolox)
    curves: dict[str, list[dict[str, Any]]] = dict(previous["curves"]) if previous else {}
    todo = [a for a in config.approaches if a not in curves]
    if "image:coreset" in todo:
        key = json.dumps([dataset.display_name, [s.image_id for s in prepared.pool.samples]])
        data.image_features = extract_features(
            "imgnet", data.pool_images, {}, Path(config.output) / "cache", key
        )
    coco, names = load_coco_yolox_nano(expand_path(config.model))
    init = initial_yolox(coco, names, data.labels)

    def train(samples: list[TrainSample], start: YoloxNano | None = None) -> YoloxNano:
        """Fine-tune ``start`` (default: the COCO model re-cut to the labels) on ``samples``."""
        return train_yolox(samples, init if start is None else start, yolox, input_hw=data.input_hw)

    n = len(data.pool_images)
    rng = np.random.default_rng(seed)
    n_init = min(n - 1, max(config.min_init_images, math.ceil(config.init_fraction * n)))
    init_images = sorted(rng.permutation(n)[:n_init].tolist())
    pool_objects = sum(len(b.kept()) for b in data.pool_truth)
    k = max(1, round(config.k_fraction * pool_objects))
    say = tqdm(
        total=2 + len(todo) * config.episodes,
        desc=f"{dataset.display_name} seed {seed}",
        disable=not progress,
    )
    if previous is not None:
        full_map = float(previous["full_map50"])
    else:
        full = train([TrainSample(data.pool_images[i], data.pool_truth[i]) for i in range(n)])
        full_map = _held_out_map(full, data)
    say.update()
    initial = train([TrainSample(data.pool_images[i], data.pool_truth[i]) for i in init_images])
    init_boxes = sum(len(data.pool_truth[i].kept()) for i in init_images)
    start_point = {
        "episode": 0,
        "boxes_labeled": init_boxes,
        "boxes_looked_at": init_boxes,
        "map50": _held_out_map(initial, data),
    }
    say.update()
    approach_seconds: dict[str, float] = (
        dict(previous.get("approach_seconds", {})) if previous else {}
    )
    for approach in todo:
        approach_started = time.perf_counter()
        campaign = _Campaign(approach, data, init_images, train, config, seed, k)
        model, curve = initial, [start_point]
        for number in range(1, config.episodes + 1):
            model, record = campaign.episode(model, number)
            curve.append(record)
            say.update()
            say.set_postfix_str(f"{approach} ep{number} mAP {record['map50']:.3f}")
        curves[approach] = curve
        approach_seconds[approach] = round(time.perf_counter() - approach_started, 1)
    say.close()
    seconds = time.perf_counter() - started + (float(previous["seconds"]) if previous else 0.0)
    return {
        "schema": SCHEMA,
        "run_key": config.run_key(dataset, seed, prepared.duplicates),
        "dataset": dataset.display_name,
        "duplicate_images": prepared.duplicates,
        "seed": seed,
        "pool_images": n,
        "pool_objects": pool_objects,
        "test_images": len(data.test_images),
        "init_images": n_init,
        "k": k,
        "input_hw": list(data.input_hw),
        "full_map50": full_map,
        "curves": curves,
        "approach_seconds": approach_seconds,
        "seconds": round(seconds, 1),
    }


def run_box_bench(
    config: BoxBenchConfig, force: bool = False, progress: bool = True, report_only: bool = False
) -> tuple[list[dict[str, Any]], list[Path]]:
    """Run (or reuse) every dataset × seed, then write the report; returns runs and files.

    ``report_only`` runs nothing: the report covers the stored runs of this config (e.g. the
    seeds that finished before a grid was stopped; the report says which seeds it holds).
    """
    out = Path(config.output)
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    if not report_only:
        (out / "experiment.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))
    runs = []
    for dataset in config.datasets:
        hashed: list[list[str]] | None = None  # the dataset's identical images, hashed once
        for seed in config.seeds:
            path = runs_dir / f"{_slug(dataset.display_name)}__seed{seed}.json"
            cached = None
            if path.is_file() and not force:
                cached = json.loads(path.read_text())
                # the split keeps identical images together, so they are part of the key: a
                # run records its groups (as decoded); one from before they were recorded is
                # checked against the files' (as benchmark.runner does)
                groups = cached.get("duplicate_images")
                if groups is None:
                    hashed = dataset_duplicates(dataset) if hashed is None else hashed
                    groups = hashed
                key = config.run_key(dataset, seed, groups)
                if cached.get("schema") != SCHEMA or cached.get("run_key") != key:
                    cached = None
            if cached is not None and all(a in cached["curves"] for a in config.approaches):
                runs.append(cached)
                continue
            if report_only:
                continue
            run = run_dataset_seed(config, dataset, seed, progress, previous=cached)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(run, indent=2))
            tmp.replace(path)
            runs.append(run)
    if not runs:
        raise ConfigError(f"no stored runs of this config under {runs_dir}")
    # the report covers this config's approaches, in its order, whatever else a run file holds
    runs = [
        {**r, "curves": {a: r["curves"][a] for a in config.approaches if a in r["curves"]}}
        for r in runs
    ]
    return runs, write_box_report(out, config, runs)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)
