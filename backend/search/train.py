"""Training the search model from images with boxes (no paired sketch compositions).

Two stages, as in the paper (§3.3):

1. **Single-object embedding** f_s / f_i (+ class embeddings), beforehand, with a triplet loss on
   same-class sketch–crop pairs: anchors are sketches and class embeddings, positives crops of
   the anchor's class, negatives crops of another class; crop–crop triplets keep f_i's classes
   apart (f_i builds the training query tensors in stage 2).
2. **Spatial encoder** f_t and the image head: for each training image, a query tensor is painted
   from the f_i embeddings of 1–3 of its own boxes (crops stand in for sketches), and
   ``0.8·(1 − cos(E_I, E_Q')) + 0.15·CE(g(E_I), c(I)) + 0.05·[m − cos(E_Q', E_I) + cos(E_Q',
   E_I(neg))]₊`` with m = 0.3 and a random other image of the batch as the negative. (Eq. 7 as
   printed reads ``m + cos(pos) − cos(neg)``, which would push the pair apart; the usual sign is
   used.) The CE is the multi-label form: cross-entropy against the image's classes, normalised.
   ``sketch_mix`` (default 0.5) swaps each object's crop embedding, with that probability, for
   the f_s of a training sketch of the same class: f_t then sees what it meets at query time.
   No sketch is paired with an image (the paper's constraint still holds); 0 is the paper's
   crops-only training. Measured in ``benchmark/results/search/``.

Inputs are precomputed frozen-backbone features (:mod:`backend.search.backbone`), so both stages
run in minutes on 2 CPU cores.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from backend.search.backbone import MAP_CHANNELS, MAP_SIDE
from backend.search.model import SearchModel, SearchModelConfig
from backend.search.tensor import paint_query_tensors

__all__ = [
    "SketchSet",
    "TrainConfig",
    "TrainImage",
    "train_object_encoder",
    "train_search_model",
    "train_spatial",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainImage:
    """One training image: its frozen backbone map and its boxes.

    Attributes:
        map: ``(320·49,)`` float32 backbone map of the whole image.
        boxes: ``(n, 4)`` canvas fractions ``xyxy``.
        labels: ``(n,)`` class indices into the model's label list.
        crops: ``(n, 1280)`` pooled backbone features of the boxes' crops.
    """

    map: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    crops: np.ndarray


@dataclass(frozen=True)
class SketchSet:
    """Sketch rasters' pooled features ``(m, 1280)`` and their class indices ``(m,)``."""

    features: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class TrainConfig:
    """Training settings (defaults: what trains in a few minutes on 2 CPU cores).

    The loss weights and margin are the paper's; its learning rate (1e-4, Adam, weight decay
    5e-4) is for a GPU run of millions of images, a higher one suits these small heads.
    """

    model: SearchModelConfig = field(default_factory=SearchModelConfig)
    object_steps: int = 600
    object_batch: int = 64
    triplet_margin: float = 0.2
    spatial_epochs: int = 60
    spatial_batch: int = 32
    max_query_objects: int = 3
    lr: float = 1e-3
    weight_decay: float = 5e-4
    w_sim: float = 0.8
    w_ce: float = 0.15
    w_con: float = 0.05
    con_margin: float = 0.3
    flip: bool = True
    sketch_mix: float = 0.5
    seed: int = 0
    num_threads: int = 2


def _triplet(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor, margin: float) -> torch.Tensor:
    """Triplet loss on cosine distance of unit vectors."""
    return F.relu(margin - (a * p).sum(-1) + (a * n).sum(-1)).mean()


def train_object_encoder(
    model: SearchModel,
    crops: np.ndarray,
    crop_labels: np.ndarray,
    sketches: SketchSet,
    config: TrainConfig,
) -> list[float]:
    """Stage 1: train ``model.objects`` in place; returns the loss per 50 steps."""
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    crop_labels = np.asarray(crop_labels)
    classes = np.unique(crop_labels)
    if len(classes) < 2:
        raise ValueError("the object embedding needs crops of at least two classes")
    by_class = {int(c): np.flatnonzero(crop_labels == c) for c in classes}
    sketch_ok = np.flatnonzero(np.isin(sketches.labels, classes))
    x_crop = torch.from_numpy(np.asarray(crops, np.float32))
    x_sketch = torch.from_numpy(np.asarray(sketches.features, np.float32))
    net = model.objects.train()
    opt = torch.optim.Adam(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    b = config.object_batch
    history: list[float] = []
    running = 0.0

    def positives_and_negatives(anchor_classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos = np.array([rng.choice(by_class[int(c)]) for c in anchor_classes])
        neg_classes = np.array(
            [rng.choice(classes[classes != c]) for c in anchor_classes], dtype=np.int64
        )
        neg = np.array([rng.choice(by_class[int(c)]) for c in neg_classes])
        return pos, neg

    for step in range(config.object_steps):
        loss = torch.zeros(())
        if len(sketch_ok):
            s_idx = rng.choice(sketch_ok, size=b)
            s_cls = sketches.labels[s_idx]
            pos, neg = positives_and_negatives(s_cls)
            loss = loss + _triplet(
                net.f_s(x_sketch[s_idx]),
                net.f_i(x_crop[pos]),
                net.f_i(x_crop[neg]),
                config.triplet_margin,
            )
        c_cls = rng.choice(classes, size=b)
        pos, neg = positives_and_negatives(c_cls)
        loss = loss + _triplet(
            net.f_c(torch.from_numpy(c_cls.astype(np.int64))),
            net.f_i(x_crop[pos]),
            net.f_i(x_crop[neg]),
            config.triplet_margin,
        )
        a_cls = rng.choice(classes, size=b)
        anchor = np.array([rng.choice(by_class[int(c)]) for c in a_cls])
        pos, neg = positives_and_negatives(a_cls)
        loss = loss + _triplet(
            net.f_i(x_crop[anchor]),
            net.f_i(x_crop[pos]),
            net.f_i(x_crop[neg]),
            config.triplet_margin,
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        running += loss.item()
        if (step + 1) % 50 == 0:
            history.append(running / 50)
            running = 0.0
    net.eval()
    return history


def _sample_objects(image: TrainImage, rng: np.random.Generator, max_objects: int) -> np.ndarray:
    """1..max_objects box indices of ``image``, larger boxes more likely (as people sketch)."""
    n = len(image.boxes)
    k = int(rng.integers(1, min(max_objects, n) + 1))
    areas = (image.boxes[:, 2] - image.boxes[:, 0]) * (image.boxes[:, 3] - image.boxes[:, 1])
    p = np.sqrt(np.maximum(areas, 1e-6))
    return rng.choice(n, size=k, replace=False, p=p / p.sum())


def train_spatial(
    model: SearchModel,
    images: Sequence[TrainImage],
    config: TrainConfig,
    sketches: SketchSet | None = None,
) -> list[float]:
    """Stage 2: train f_t and the image head (three losses); returns the loss per epoch."""
    images = [im for im in images if len(im.boxes)]
    if len(images) < 2:
        raise ValueError("f_t needs at least two training images with boxes")
    rng = np.random.default_rng(config.seed + 1)
    torch.manual_seed(config.seed + 1)
    num_classes = len(model.labels)
    obj = [model.crop_embeddings(im.crops) for im in images]
    sketch_emb: dict[int, np.ndarray] = {}
    if sketches is not None and config.sketch_mix > 0 and len(sketches.labels):
        all_s = model.sketch_embeddings(sketches.features)
        for cls in np.unique(sketches.labels):
            sketch_emb[int(cls)] = all_s[sketches.labels == cls]
    maps = torch.from_numpy(np.stack([im.map for im in images]).astype(np.float32))
    maps = maps.reshape(-1, MAP_CHANNELS, MAP_SIDE, MAP_SIDE)
    targets = torch.zeros(len(images), num_classes)
    for i, im in enumerate(images):
        targets[i, torch.as_tensor(im.labels, dtype=torch.long)] = 1.0
    targets = targets / targets.sum(1, keepdim=True).clamp(min=1.0)
    params = [*model.spatial.parameters(), *model.image.parameters()]
    opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    model.spatial.train()
    model.image.train()
    c, m = model.config.object_dim, config.max_query_objects
    history = []
    for _epoch in range(config.spatial_epochs):
        order = rng.permutation(len(images))
        total, steps = 0.0, 0
        for s in range(0, len(order), config.spatial_batch):
            idx = order[s : s + config.spatial_batch]
            if len(idx) < 2:
                continue
            bsz = len(idx)
            emb = torch.zeros(bsz, m, c)
            boxes = torch.zeros(bsz, m, 4)
            valid = torch.zeros(bsz, m, dtype=torch.bool)
            flips = rng.random(bsz) < 0.5 if config.flip else np.zeros(bsz, bool)
            for j, i in enumerate(idx):
                pick = _sample_objects(images[i], rng, m)
                bx = images[i].boxes[pick].copy()
                if flips[j]:
                    bx[:, [0, 2]] = 1.0 - bx[:, [2, 0]]
                chosen = obj[i][pick].copy()
                for r, label in enumerate(images[i].labels[pick]):
                    pool = sketch_emb.get(int(label))
                    if pool is not None and rng.random() < config.sketch_mix:
                        chosen[r] = pool[rng.integers(len(pool))]
                emb[j, : len(pick)] = torch.from_numpy(chosen)
                boxes[j, : len(pick)] = torch.from_numpy(bx)
                valid[j, : len(pick)] = True
            batch_maps = maps[idx].clone()
            flip_t = torch.from_numpy(flips)
            batch_maps[flip_t] = torch.flip(batch_maps[flip_t], dims=[3])
            e_q = F.normalize(
                torch.flatten(model.spatial(paint_query_tensors(emb, boxes, valid)), 1)
            )
            raw_i = torch.flatten(model.image(batch_maps), 1)
            e_i = F.normalize(raw_i)
            e_neg = torch.roll(e_i, shifts=1, dims=0)  # another image of the batch
            cos_pos = (e_q * e_i).sum(1)
            l_sim = (1.0 - cos_pos).mean()
            l_ce = -(targets[idx] * F.log_softmax(model.image.g(raw_i), dim=1)).sum(1).mean()
            l_con = F.relu(config.con_margin - cos_pos + (e_q * e_neg).sum(1)).mean()
            loss = config.w_sim * l_sim + config.w_ce * l_ce + config.w_con * l_con
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
            steps += 1
        history.append(total / max(steps, 1))
    model.eval()
    return history


def train_search_model(
    labels: Sequence[str],
    images: Sequence[TrainImage],
    sketches: SketchSet,
    config: TrainConfig | None = None,
) -> SearchModel:
    """Both stages, then the PCA to the index's space on the training images' E_I."""
    config = config or TrainConfig()
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, config.num_threads))
    try:
        started = time.perf_counter()
        torch.manual_seed(config.seed)  # the nets' initial weights
        model = SearchModel.create(labels, config.model)
        crops = np.concatenate([im.crops for im in images if len(im.boxes)])
        crop_labels = np.concatenate([im.labels for im in images if len(im.boxes)])
        object_losses = train_object_encoder(model, crops, crop_labels, sketches, config)
        t_object = time.perf_counter() - started
        spatial_losses = train_spatial(model, images, config, sketches)
        model.fit_reduction(model.encode_maps(np.stack([im.map for im in images])))
        model.meta = {
            "train_images": len(images),
            "train_crops": len(crops),
            "train_sketches": len(sketches.labels),
            "seed": config.seed,
            "object_loss": [round(v, 4) for v in object_losses],
            "spatial_loss": [round(v, 4) for v in spatial_losses],
            "seconds_object": round(t_object, 1),
            "seconds_total": round(time.perf_counter() - started, 1),
        }
        log.info("search model trained: %s", model.meta)
        return model
    finally:
        torch.set_num_threads(previous)
