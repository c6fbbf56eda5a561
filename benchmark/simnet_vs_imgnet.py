"""Does SimNet (trained on the pool) give better features than ImgNet? A retrieval check.

Run (writes ``benchmark/results/simnet_vs_imgnet.json`` and prints a table)::

    .venv/bin/python -m benchmark.simnet_vs_imgnet                 # 3 seeds × 25 epochs
    .venv/bin/python -m benchmark.simnet_vs_imgnet --epochs 2 --seeds 0   # smoke run

Data: the shared data's real photos (``$BOXLOOP_SHARED_DATA``, default ``../shared/data``): VOC2012
subset (70), COCO mini (80), raccoon (150), KITTI tiny (75). SimNet trains on all of them, without
labels — the unlabelled pool, as in the paper.

Checks:

1. **Same-dominant-class retrieval** (the one that matters for ordering): VOC + COCO images, each
   labelled by the class covering the largest box area (COCO names mapped onto VOC's where they
   are the same class). Every image queries all others by Euclidean feature distance;
   AP@K = (1/D) Σ_{k≤K} P(k)·rel(k) with D = min(K, relevant items in the collection) (method
   notes); queries whose class occurs once are left out and counted.
2. **Half-image matching** (SimNet's own training task, so in-sample for it): the left half of
   each pool image queries the right halves of all pool images; top-1 accuracy and MRR.

ImgNet is deterministic; SimNet is trained once per seed and reported as mean ± sd over seeds,
with a paired bootstrap (over queries) of the AP@K difference SimNet − ImgNet.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from backend.features import SimNetConfig, effnet_lite0_extractor, split_halves, train_simnet
from backend.features.base import FeatureExtractor
from benchmark.datasets import (
    Dataset,
    SkippedImage,
    decode_images,
    default_shared_data,
    load_coco,
    load_kitti,
    load_voc,
)

RESULTS = Path(__file__).resolve().parent / "results" / "simnet_vs_imgnet.json"

#: COCO names of classes VOC also has, mapped onto VOC's names.
COCO_TO_VOC = {
    "airplane": "aeroplane",
    "motorcycle": "motorbike",
    "couch": "sofa",
    "tv": "tvmonitor",
    "dining table": "diningtable",
    "potted plant": "pottedplant",
}


def dominant_class(dataset: Dataset, index: int) -> str | None:
    """The class covering the largest total box area (ignored boxes left out)."""
    boxes = dataset.samples[index].boxes.kept()
    if len(boxes) == 0:
        return None
    areas: dict[str, float] = {}
    for label, area in zip(boxes.labels.tolist(), boxes.areas.tolist(), strict=True):
        name = dataset.labels[int(label)]
        name = COCO_TO_VOC.get(name, name)
        areas[name] = areas.get(name, 0.0) + float(area)
    return max(areas, key=lambda k: (areas[k], k))


def ap_at_k(ranked_relevance: np.ndarray, k: int, n_relevant: int) -> float:
    """AP@K with D = min(K, relevant items in the collection)."""
    rel = ranked_relevance[:k].astype(float)
    precision = np.cumsum(rel) / np.arange(1, len(rel) + 1)
    return float((precision * rel).sum() / min(k, n_relevant))


def class_retrieval(feats: np.ndarray, labels: list[str | None], k: int) -> tuple[np.ndarray, int]:
    """Per-query AP@K (NaN for left-out queries) and the number left out."""
    d2 = ((feats[:, None, :] - feats[None, :, :]) ** 2).sum(-1)
    lab = np.array([lbl if lbl is not None else "" for lbl in labels], dtype=object)
    aps = np.full(len(labels), np.nan)
    left_out = 0
    for q in range(len(labels)):
        if labels[q] is None:
            continue
        others = np.array([i for i in range(len(labels)) if i != q])
        relevant = lab[others] == labels[q]
        if not relevant.any():
            left_out += 1
            continue
        ranking = others[np.lexsort((others, d2[q, others]))]
        aps[q] = ap_at_k(lab[ranking] == labels[q], k, int(relevant.sum()))
    return aps, left_out


def half_matching(extractor: FeatureExtractor, images: Sequence[Image.Image]) -> dict[str, float]:
    lefts, rights = zip(*(split_halves(im, "left_right") for im in images), strict=True)
    a = extractor.extract(list(lefts), progress=False)
    b = extractor.extract(list(rights), progress=False)
    d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    ranks = (d2 < d2[np.arange(len(a)), np.arange(len(a))][:, None]).sum(1)  # 0 = found first
    return {"top1": float((ranks == 0).mean()), "mrr": float((1.0 / (ranks + 1)).mean())}


def bootstrap_diff(
    a: np.ndarray, b: np.ndarray, seed: int = 0, rounds: int = 10_000
) -> list[float]:
    """95 % interval of mean(a − b) over paired queries (percentile bootstrap)."""
    diff = a - b
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (rounds, len(diff)))].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def load_pool(
    root: Path,
) -> tuple[list[Image.Image], list[str | None], int, list[SkippedImage]]:
    """All pool images, the dominant class of the first ``n_labelled`` (VOC + COCO) ones, and the
    images left out because they could not be decoded (each with a warning)."""
    labelled = [load_voc(root / "voc" / "VOCdevkit" / "VOC2012"), load_coco(root / "coco" / "mini")]
    extra = [load_voc(root / "voc" / "raccoon"), load_kitti(root / "kitti" / "tiny")]
    images: list[Image.Image] = []
    labels: list[str | None] = []
    skipped: list[SkippedImage] = []
    n_labelled = 0
    for k, loaded in enumerate([*labelled, *extra]):
        ds, decoded = decode_images(loaded)  # an undecodable image is skipped, not fatal
        skipped += ds.skipped
        images.extend(decoded[s.image_id] for s in ds.samples)
        if k < len(labelled):
            labels.extend(dominant_class(ds, i) for i in range(len(ds)))
            n_labelled = len(images)
    return images, labels, n_labelled, skipped


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--trainable-from", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=Path("var/boxloop/bench_simnet"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    root = default_shared_data()
    if not root.is_dir():
        raise SystemExit(f"shared data not found at {root} (set BOXLOOP_SHARED_DATA)")
    load_before = [round(v, 2) for v in os.getloadavg()]
    images, labels, n_lab, skipped = load_pool(root)
    print(f"pool: {len(images)} images, {n_lab} with a dominant class", flush=True)
    imgnet = effnet_lite0_extractor(args.work_dir / "onnx", num_threads=args.threads)
    f_img = imgnet.extract(images, progress=False)
    img_aps, left_out = class_retrieval(f_img[:n_lab], labels[:n_lab], args.k)
    valid = ~np.isnan(img_aps)
    result: dict[str, Any] = {
        "meta": {
            "pool_images": len(images),
            "retrieval_images": n_lab,
            "queries": int(valid.sum()),
            "queries_left_out_single_class": left_out,
            "k": args.k,
            "ap_definition": "D = min(K, relevant in collection)",
            "seeds": args.seeds,
            "load_before": load_before,
            "threads": args.threads,
            "classes": sorted({lbl for lbl in labels[:n_lab] if lbl}),
            "skipped_images": [s.to_dict() for s in skipped],
        },
        "imgnet": {
            "extractor": imgnet.name,
            f"class_map@{args.k}": float(np.nanmean(img_aps)),
            "half_matching": half_matching(imgnet, images),
        },
        "simnet": {"runs": []},
    }
    print(f"ImgNet class mAP@{args.k} = {np.nanmean(img_aps):.3f}", flush=True)
    per_query = []
    for seed in args.seeds:
        cfg = SimNetConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=seed,
            trainable_from=args.trainable_from,
            num_threads=args.threads,
        )
        start = time.perf_counter()
        ext = train_simnet(images, args.work_dir / f"seed{seed}", cfg, progress=True)
        train_s = time.perf_counter() - start
        feats = ext.extract(images, progress=False)
        aps, _ = class_retrieval(feats[:n_lab], labels[:n_lab], args.k)
        per_query.append(aps)
        run = {
            "seed": seed,
            "extractor": ext.name,
            "train_seconds": round(train_s, 1),
            "epoch_loss": ext.record["epoch_loss"],
            f"class_map@{args.k}": float(np.nanmean(aps)),
            "half_matching": half_matching(ext, images),
        }
        result["simnet"]["runs"].append(run)
        print(json.dumps(run), flush=True)
    maps = [r[f"class_map@{args.k}"] for r in result["simnet"]["runs"]]
    top1 = [r["half_matching"]["top1"] for r in result["simnet"]["runs"]]
    mean_aps = np.stack(per_query).mean(axis=0)  # NaN only for left-out queries
    interval = bootstrap_diff(mean_aps[valid], img_aps[valid])
    result["simnet"].update(
        {
            "config": {
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "lr": args.lr,
                "trainable_from": args.trainable_from,
            },
            f"class_map@{args.k}_mean": float(np.mean(maps)),
            f"class_map@{args.k}_sd": float(np.std(maps, ddof=1)) if len(maps) > 1 else 0.0,
            "half_top1_mean": float(np.mean(top1)),
            "half_top1_sd": float(np.std(top1, ddof=1)) if len(top1) > 1 else 0.0,
        }
    )
    result["comparison"] = {
        f"class_map@{args.k}_difference_simnet_minus_imgnet": float(
            np.mean(maps) - np.nanmean(img_aps)
        ),
        "bootstrap_95ci_over_queries": interval,
        "simnet_better": bool(interval[0] > 0),
        "imgnet_better": bool(interval[1] < 0),
    }
    result["meta"]["load_after"] = [round(v, 2) for v in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    k = args.k
    print(f"\n| features | class mAP@{k} (D=min(K,#rel)) | half-image top-1 |")
    print("|---|---:|---:|")
    print(
        f"| ImgNet ({imgnet.name}) | {result['imgnet'][f'class_map@{k}']:.3f} | "
        f"{result['imgnet']['half_matching']['top1']:.3f} |"
    )
    print(
        f"| SimNet ({len(args.seeds)} seeds, {args.epochs} epochs) | "
        f"{result['simnet'][f'class_map@{k}_mean']:.3f} ± {result['simnet'][f'class_map@{k}_sd']:.3f} | "
        f"{result['simnet']['half_top1_mean']:.3f} ± {result['simnet']['half_top1_sd']:.3f} |"
    )
    print(
        f"\nSimNet − ImgNet class mAP@{k}: {result['comparison'][f'class_map@{k}_difference_simnet_minus_imgnet']:+.3f}, "
        f"95% CI over queries {interval[0]:+.3f} .. {interval[1]:+.3f}"
    )


if __name__ == "__main__":
    main()
