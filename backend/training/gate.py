"""One training round with a promotion gate: train a candidate, score it beside the serving
version on annotations neither trained on, and promote it only when it is better.

Why a gate: a fine-tuned detector is not always better than what serves. On classes COCO knows,
a small fine-tune can forget (VOC mAP@0.5 0.784 → 0.717 after 42 images in the prototype), and
loose or false boxes cost an annotator more to fix than they save. So every round:

1. holds back a validation slice of the annotated tasks, chosen by a hash of the task key (the
   same task is always in the same slice, whatever else arrives), among the tasks the serving
   version did not train on (``serving_trained_on``; see below), or, while fewer than
   ``cv_below`` tasks exist, scores by ``cv_folds``-fold cross-validation so that every task is
   predicted by a model that did not train on it. Below 30 tasks a 20 % slice holds under 6,
   and the sign-flip test of step 3 can reach at most ``1 − 2^-n`` on ``n`` images: a new-class
   candidate that saves time on 3 of 4 images could not pass. Cross-validation scores all of
   them, by fold models trained on half the data, for the cost of two extra trainings. Each
   fold model sees as many images in all as the candidate (``cv_fold_epochs="visits"``, the
   default): twice the candidate's epochs on half the images, past ``max_epochs`` if need be.
   The fold models stand in for the candidate twice, in the gate's decision and in the score
   threshold chosen on their predictions, so they must be as confident as it is. Fold models
   with half its steps (``"candidate"``: the candidate's epochs) score lower, and the threshold
   chosen on them fell to 0.05 on a class COCO lacks where the candidate's best was 0.3
   (``benchmark/results/loop/README.md``). The price: on classes COCO knows, fold models that
   see each of their images twice as often forget more than the candidate, so the gate waits a
   round longer there (KITTI). ``"by_size"`` gives each its own data size's epochs
   (``image_visits`` over half the images, up to ``max_epochs``);
2. scores the candidate and the serving version on the same tasks with
   :func:`backend.scoring.score_predictions` — mAP@0.5 and the simulated annotator's W_B / W_T,
   the harness's oracle, one implementation — each at the score threshold it would serve at
   (least W_T on the slice, moved toward the product's default threshold while the slice is too
   small to tell them apart: the one-standard-error rule of :func:`score_predictions`);
3. promotes the candidate only when it is no worse on both mAP@0.5 and W_B, better on one, and
   saves annotation time (W_T) with confidence: a paired sign-flip test over the slice's images
   must reject "no better" at level ``1 − confidence`` (:func:`time_saved_confidence`). On a
   4-image slice one image decides a point comparison; the grid of issue 12 promoted a VOC
   candidate that way whose held-out mAP@0.5 fell from 0.877 to 0.674. A candidate for labels
   the serving version cannot predict wins on nearly every image and passes once the slice
   holds :attr:`GateConfig.min_slice` images.

Both models are scored only on tasks neither trained on. A slice chosen by hash alone cannot
promise that: a version promoted by a cross-validation round trained on every task of that round,
and about a fifth of them fall in every later slice, so the grids before this rule scored the
serving version partly on its own training images. With ``serving_unseen_only`` (the default) the
slice is drawn from the tasks that neither the serving version nor the candidate's starting point
trained on (their metadata's ``trained_on``), as many as the slice would hold otherwise; a
cross-validation round compares on the fold predictions of those tasks and chooses the threshold
on every task its starting point did not see. The rule is what makes a warm start safe: a
candidate that continues from the serving version (``Settings.yolox_warm_start``, the
default) would otherwise be judged on images both models trained on.

A promoted version serves at its chosen threshold; one whose best threshold still costs more
than drawing by hand serves no boxes (``serves_boxes`` false; a tie serves, see
:attr:`~backend.scoring.ValidationScore.serves_boxes`). In a cross-validation round the
threshold was chosen on the fold models' scores. With ``calibration_images`` set and unannotated
images given, the round serves the candidate at the score that keeps as many boxes on them as
the fold models kept at the chosen threshold (:mod:`backend.training.calibration`; off by
default, measured neutral with half-step folds). The harness calls
:func:`run_round` exactly as the training job does.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, get_args

import numpy as np
from PIL import Image

from backend.boxes import Boxes
from backend.detectors.versions import (
    load_version_detector,
    save_model_version,
    update_metadata,
)
from backend.detectors.yolox import YoloxNano
from backend.jsonsafe import finite
from backend.scoring import ValidationScore, score_predictions
from backend.settings import FoldEpochRule, Settings
from backend.training.calibration import CountMatch, count_matched_threshold
from backend.training.samples import ImageLike, LazyImage, LoadedImages, TrainSample
from backend.training.yolox_train import (
    YoloxTrainConfig,
    epochs_for,
    input_shape_for,
    train_yolox,
)

__all__ = [
    "GateConfig",
    "LabeledImage",
    "RoundOutcome",
    "decide",
    "run_round",
    "score_dict",
    "time_saved_confidence",
    "validation_split",
]

log = logging.getLogger(__name__)

PredictFn = Callable[[Sequence[Image.Image]], list[Boxes]]
ProgressFn = Callable[[float, str], None]

#: Thresholds the gate tries for each model; the W_T-best one is what the version serves at.
DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 19))
FOLD_EPOCH_RULES: tuple[str, ...] = get_args(FoldEpochRule)


@dataclass(frozen=True)
class GateConfig:
    """How a round holds data back and judges a candidate."""

    validation_fraction: float = 0.2
    min_validation: int = 3
    cv_below: int = 30
    cv_folds: int = 2
    #: Epochs of a cross-validation fold model: ``"visits"``, as many image visits as the
    #: candidate (its epochs × all images / the fold's images); ``"candidate"``, the candidate's
    #: epochs (half the steps on half the data); ``"by_size"``, those its own data size gets.
    cv_fold_epochs: FoldEpochRule = "visits"
    iou_threshold: float = 0.5
    score_floor: float = 0.05
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    prefer_threshold: float | None = 0.3
    confidence: float = 0.9
    sign_flip_samples: int = 2000
    salt: str = "boxloop-validation"
    #: Score only on tasks that neither the serving version nor the candidate's starting model
    #: trained on (their ``trained_on``). False reproduces the grids before this rule, which
    #: scored the serving version partly on its own training tasks.
    serving_unseen_only: bool = True
    #: Unannotated images on which a cross-validation round carries its threshold over to the
    #: candidate's score scale (:mod:`backend.training.calibration`); 0 keeps it as chosen.
    #: Off by default: on the loop grid it moved the served W_T both ways, +0.05 points on
    #: average (``benchmark/results/loop_calibrated/README.md``).
    calibration_images: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.validation_fraction < 1:
            raise ValueError("validation_fraction must be in (0, 1)")
        if self.cv_folds < 2:
            raise ValueError("cv_folds must be at least 2")
        if self.cv_fold_epochs not in FOLD_EPOCH_RULES:
            raise ValueError(
                f"cv_fold_epochs must be one of {', '.join(FOLD_EPOCH_RULES)}, "
                f"not {self.cv_fold_epochs!r}"
            )
        if not 0 <= self.confidence < 1:
            raise ValueError("confidence must be in [0, 1)")
        if self.sign_flip_samples < 1:
            raise ValueError("sign_flip_samples must be at least 1")
        if self.calibration_images < 0:
            raise ValueError("calibration_images must be at least 0")

    @property
    def min_slice(self) -> int:
        """Validation images a round holds back at least: ``min_validation``, or the fewest on
        which :func:`time_saved_confidence` can reach ``confidence`` (``1 − 2^-n``; 4 at 0.9)."""
        if self.confidence <= 0:
            return self.min_validation
        return max(self.min_validation, math.ceil(math.log2(1.0 / (1.0 - self.confidence))))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["thresholds"] = list(self.thresholds)
        return out

    @classmethod
    def from_settings(cls, settings: Settings) -> GateConfig:
        return cls(
            validation_fraction=settings.gate_validation_fraction,
            cv_below=settings.gate_cv_below,
            cv_fold_epochs=settings.gate_cv_fold_epochs,
            prefer_threshold=settings.score_threshold,
            confidence=settings.gate_confidence,
            calibration_images=settings.gate_calibration_images,
        )


@dataclass(frozen=True)
class LabeledImage:
    """An annotated image: ``key`` (task id) decides its validation slice."""

    key: int | str
    #: decoded, or a :class:`LazyImage` (past a training job's memory budget)
    image: Image.Image | LazyImage
    boxes: Boxes
    #: Loss weight per box (None: all 1); box-query tasks weigh unverified boxes at λ_d.
    box_weights: np.ndarray | None = None


@dataclass
class RoundOutcome:
    """What a round made and decided (recorded with the version and shown in ``/status``)."""

    directory: Path
    candidate: YoloxNano
    promoted: bool
    reason: str
    candidate_score: ValidationScore
    serving_score: ValidationScore
    threshold: float
    serves_boxes: bool
    input_hw: tuple[int, int]
    n_train: int
    n_validation: int
    mode: str
    #: How a cross-validation round carried its threshold to the candidate (None: it did not).
    calibration: CountMatch | None = None
    #: Keys of the tasks the candidate trained on, its starting point's included (the next round
    #: keeps them out of its slice).
    trained_on: tuple[int | str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def metrics(self) -> dict[str, Any]:
        validation: dict[str, Any] = {
            "mode": self.mode,
            "n_train": self.n_train,
            "n_validation": self.n_validation,
            "candidate": score_dict(self.candidate_score),
            "serving": score_dict(self.serving_score),
        }
        if self.calibration is not None:
            validation["calibration"] = self.calibration.to_dict()
        return {
            "status": "promoted" if self.promoted else "rejected",
            "reason": self.reason,
            "score_threshold": self.threshold,
            "serves_boxes": self.serves_boxes,
            "validation": validation,
        }


def _span(say: ProgressFn, start: float, end: float, prefix: str = "") -> ProgressFn:
    """``say`` for one training of a round: its fractions mapped onto ``[start, end]``."""
    return lambda fraction, message: say(start + (end - start) * fraction, prefix + message)


def _fold_of(key: int | str, folds: int, salt: str) -> int:
    return min(folds - 1, int(_unit_hash(key, f"{salt}:folds") * folds))


def fold_epochs(rule: FoldEpochRule, n_all: int, n_fold: int, config: YoloxTrainConfig) -> int:
    """Epochs of a fold model trained on ``n_fold`` of the round's ``n_all`` images, by
    :attr:`GateConfig.cv_fold_epochs`."""
    if rule == "by_size":
        return epochs_for(n_fold, config)
    candidate = epochs_for(n_all, config)
    if rule == "visits":
        return max(1, round(candidate * n_all / max(1, n_fold)))
    return candidate


def score_dict(score: ValidationScore) -> dict[str, Any]:
    """JSON-ready (NaN → null, e.g. mAP on a slice with no boxes), without per-image costs."""
    out = dict(finite(asdict(score)))
    for entry in out["thresholds"]:
        entry.pop("image_w_t", None)
    return out


def _unit_hash(key: int | str, salt: str) -> float:
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def validation_split(
    keys: Sequence[int | str],
    config: GateConfig,
    seen: Collection[int | str] = (),
) -> tuple[list[int], list[int]]:
    """``(train indices, validation indices)``.

    A task is in the slice when the hash of its key falls below ``validation_fraction``: the
    decision is the task's own, so tasks arriving later never move an earlier task between the
    parts. ``seen``: keys of tasks the serving version trained on, never put in the slice (the
    serving version must not be scored on its own training images). The slice holds as many
    tasks as it would without them (those below the fraction, at least
    :attr:`GateConfig.min_slice`), taken from the unseen tasks in hash order; tasks topped up
    that way can later change sides.
    """
    units = [_unit_hash(k, config.salt) for k in keys]
    seen_set = set(seen)
    eligible = sorted((i for i, k in enumerate(keys) if k not in seen_set), key=units.__getitem__)
    natural = sum(1 for u in units if u < config.validation_fraction)
    want = min(max(natural, config.min_slice), max(0, len(keys) - 1), len(eligible))
    val = set(eligible[:want])
    train = [i for i in range(len(keys)) if i not in val]
    return train, sorted(val)


def time_saved_confidence(
    candidate: ValidationScore, serving: ValidationScore, samples: int = 2000, seed: int = 0
) -> float:
    """``1 − p`` of a one-sided paired sign-flip test that the candidate saves annotation time.

    Each validation image gives a gain, the serving version's ``W_T`` minus the candidate's (each
    at its serving threshold). If the candidate were no better, every gain would be as likely
    negative as positive, so ``p`` is the share of the ``2^n`` sign patterns whose total gain is
    at least the observed one. It is exact up to 16 images that differ and a Monte Carlo estimate
    from ``samples`` patterns above that.

    Why not a bootstrap of the images (the first version of this gate): with 4 validation
    images it is overconfident. Two images that gain a little and two that tie give 94 % of the
    resamples in the candidate's favour, and the COCO grid promoted such candidates, which then
    served fewer right boxes. Here the same slice gets ``1 − p = 0.75``. A candidate that saves
    time on all ``n`` images reaches at most ``1 − 2^-n``, so a slice needs
    :attr:`GateConfig.min_slice` images before any candidate can pass.
    """
    c = np.asarray(candidate.best.image_w_t, dtype=float)
    s = np.asarray(serving.best.image_w_t, dtype=float)
    if c.shape != s.shape:
        raise ValueError(f"scored on different images: {len(c)} vs {len(s)}")
    gain = s - c  # time the candidate saves on each image
    gain = gain[np.abs(gain) > 1e-9]  # a tie is the same under either sign
    observed = float(gain.sum())
    if len(gain) == 0 or observed <= 1e-9:
        return 0.5 if len(gain) == 0 else 0.0
    if len(gain) <= 16:
        patterns = (np.arange(2 ** len(gain))[:, None] >> np.arange(len(gain))) & 1
        totals = ((1 - 2 * patterns) * gain).sum(axis=1)
        p = float((totals >= observed - 1e-9).mean())
    else:
        rng = np.random.default_rng(seed)
        signs = rng.choice(np.array([-1.0, 1.0]), size=(samples, len(gain)))
        p = (1.0 + float(((signs * gain).sum(axis=1) >= observed - 1e-9).sum())) / (samples + 1)
    return 1.0 - p


def decide(
    candidate: ValidationScore, serving: ValidationScore, config: GateConfig = GateConfig()
) -> tuple[bool, str]:
    """Promote only a candidate no worse on mAP@0.5 and on W_B, better on one, and confidently
    cheaper for the annotator (:func:`time_saved_confidence` ≥ ``config.confidence``)."""
    if candidate.images == 0:
        return False, "no annotated task that the serving version did not train on to judge by"
    # mAP is undefined (NaN) on a slice without boxes: then W_B alone decides.
    c_map = candidate.map50 if math.isfinite(candidate.map50) else 0.0
    s_map = serving.map50 if math.isfinite(serving.map50) else 0.0
    c_wb, s_wb = candidate.best.w_b, serving.best.w_b
    if c_map < s_map - 1e-9:
        return False, f"mAP@0.5 {c_map:.3f} below the serving version's {s_map:.3f}"
    if c_wb > s_wb + 1e-9:
        return False, f"W_B {c_wb:.0f} boxes above the serving version's {s_wb:.0f}"
    if not (c_map > s_map + 1e-9 or c_wb < s_wb - 1e-9):
        return False, f"no better than the serving version (mAP@0.5 {c_map:.3f}, W_B {c_wb:.0f})"
    sure = time_saved_confidence(candidate, serving, config.sign_flip_samples)
    scores = (
        f"mAP@0.5 {c_map:.3f} vs {s_map:.3f}, W_B {c_wb:.0f} vs {s_wb:.0f} boxes, "
        f"W_T {candidate.best.w_t:.1f} vs {serving.best.w_t:.1f}"
    )
    if sure < config.confidence:
        return False, (
            f"not confidently better: {scores}; a sign-flip test over the {candidate.images} "
            f"validation images gives confidence {sure:.3f} that it saves time "
            f"(needs {config.confidence:.3f})"
        )
    return True, f"{scores}; confidence {sure:.3f} that it saves time (sign-flip test)"


def _samples(items: Sequence[LabeledImage]) -> list[TrainSample]:
    return [
        TrainSample(image=item.image, boxes=item.boxes, box_weights=item.box_weights)
        for item in items
    ]


def _score(
    gts: Sequence[Boxes], preds: Sequence[Boxes], labels: Sequence[str], config: GateConfig
) -> ValidationScore:
    return score_predictions(
        gts,
        preds,
        labels,
        iou_threshold=config.iou_threshold,
        score_thresholds=config.thresholds,
        prefer_threshold=config.prefer_threshold,
    )


def run_round(
    labeled: Sequence[LabeledImage],
    labels: Sequence[str],
    *,
    init: YoloxNano,
    serving_predict: PredictFn | None,
    directory: Path,
    metadata: dict[str, Any],
    settings: Settings,
    train_config: YoloxTrainConfig,
    gate: GateConfig,
    unlabeled: Sequence[Image.Image] = (),
    serving_trained_on: Collection[int | str] = (),
    init_trained_on: Collection[int | str] = (),
    progress: ProgressFn | None = None,
) -> RoundOutcome:
    """Train a candidate from ``init`` on ``labeled``, write it to ``directory`` and judge it.

    ``serving_predict`` predicts with the serving version down to ``gate.score_floor`` (None:
    nothing serves, i.e. drawing by hand). ``serving_trained_on``: keys of the tasks the serving
    version trained on (its metadata's ``trained_on``; empty for the pretrained model); with
    ``gate.serving_unseen_only`` neither model is scored on them. ``init_trained_on``: those
    ``init`` trained on, when it is a warm start from the serving version (then the fold models
    and the candidate start from a model that saw them: they are kept out of the scoring and of
    the threshold choice too). ``unlabeled``: images of tasks
    nobody annotated yet (at most ``gate.calibration_images`` are used; pick them with
    :func:`backend.training.calibration.unlabeled_sample`); a cross-validation round serves the
    candidate at the score that gives it as many boxes on them as the fold models gave at the
    chosen threshold. The candidate's directory gets the decision, both scores and the chosen
    threshold in its metadata whatever the outcome, so a rejected candidate stays inspectable
    on disk.
    """
    if not labeled:
        raise ValueError("no annotated images to train on")
    say = progress or (lambda _f, _m: None)
    hw = input_shape_for([item.image.size for item in labeled], train_config)
    keys = [item.key for item in labeled]
    init_seen = set(init_trained_on) if gate.serving_unseen_only else set()
    seen = set(serving_trained_on) | init_seen if gate.serving_unseen_only else set()
    gts_all = [item.boxes.kept() for item in labeled]

    def candidate_predict(model: YoloxNano, images: Sequence[ImageLike], tag: str) -> list[Boxes]:
        save_model_version(model, directory, {**metadata, "input_hw": list(hw), "stage": tag})
        detector = load_version_detector(directory, settings, score_floor=gate.score_floor)
        return detector.predict(LoadedImages(images))

    fold_preds_all: list[Boxes] = []  # a cross-validation round's prediction of every task
    calibration_set = list(unlabeled[: gate.calibration_images])
    fold_on_unlabeled: list[list[Boxes]] = []  # per fold model, on calibration_set
    candidate_on_unlabeled: list[Boxes] = []
    if len(labeled) < gate.cv_below:
        # Cross-validation: every image predicted by a fold model that did not see it.
        mode = f"{gate.cv_folds}-fold cross-validation"
        folds = [_fold_of(k, gate.cv_folds, gate.salt) for k in keys]
        val_index = list(range(len(labeled)))
        preds: list[Boxes | None] = [None] * len(labeled)
        plan = []  # (fold, held, rest, epochs) of each fold that holds images
        for fold in range(gate.cv_folds):
            held = [i for i in val_index if folds[i] == fold]
            rest = [i for i in val_index if folds[i] != fold]
            if held:
                epochs = fold_epochs(gate.cv_fold_epochs, len(labeled), len(rest), train_config)
                plan.append((fold, held, rest, epochs))
        # /status progress up to 0.9 in proportion to each training's image visits, so the
        # fold models (two thirds of the round under "visits") do not show as a jump.
        visits = [epochs * len(rest) for _, _, rest, epochs in plan]
        visits.append(epochs_for(len(labeled), train_config) * len(labeled))
        starts = [0.9 * sum(visits[:k]) / sum(visits) for k in range(len(visits) + 1)]
        for k, (fold, held, rest, epochs) in enumerate(plan):
            if not rest:  # every image in one fold: fall back to the untrained start
                fold_model = init
            else:
                say(starts[k], f"cross-validation fold {fold + 1}")
                fold_model = train_yolox(
                    _samples([labeled[i] for i in rest]),
                    init,
                    train_config,
                    input_hw=hw,
                    epochs=epochs,
                    progress=_span(
                        say, starts[k], starts[k + 1], f"cross-validation fold {fold + 1}: "
                    ),
                )
            fold_preds = candidate_predict(
                fold_model,
                [*(labeled[i].image for i in held), *calibration_set],
                f"cv-fold-{fold}",
            )
            for i, p in zip(held, fold_preds[: len(held)], strict=True):
                preds[i] = p
            if fold_model is not init:
                fold_on_unlabeled.append(fold_preds[len(held) :])
        say(starts[-2], "training on every annotated image")
        candidate = train_yolox(
            _samples(labeled),
            init,
            train_config,
            input_hw=hw,
            progress=_span(say, starts[-2], 0.9),
        )
        # every task was predicted by a fold model that did not see it; the serving version is
        # compared only on those it did not see either
        val_index = [i for i in val_index if keys[i] not in seen]
        fold_preds_all = [p for p in preds if p is not None]
        if len(fold_preds_all) != len(labeled):
            raise RuntimeError("a cross-validation round left an image without a prediction")
        candidate_preds = [fold_preds_all[i] for i in val_index]
        n_train = len(labeled)
        trained_on = list(keys)
        if calibration_set and fold_on_unlabeled:
            say(0.9, f"matching box counts on {len(calibration_set)} unannotated images")
            candidate_on_unlabeled = candidate_predict(candidate, calibration_set, "calibration")
    else:
        mode = "validation slice"
        train_idx, val_index = validation_split(keys, gate, seen)
        candidate = train_yolox(
            _samples([labeled[i] for i in train_idx]),
            init,
            train_config,
            input_hw=hw,
            progress=_span(say, 0.0, 0.9),
        )
        candidate_preds = candidate_predict(
            candidate, [labeled[i].image for i in val_index], "validation"
        )
        n_train = len(train_idx)
        trained_on = [keys[i] for i in train_idx]
    val_images = [labeled[i].image for i in val_index]
    val_gts = [gts_all[i] for i in val_index]
    say(0.92, f"scoring on {len(val_index)} validation images")
    candidate_score = _score(val_gts, candidate_preds, labels, gate)
    if serving_predict is None:
        serving_preds = [Boxes.empty(im.size, with_scores=True) for im in val_images]
    else:
        serving_preds = serving_predict(LoadedImages(val_images))
    serving_score = _score(val_gts, serving_preds, labels, gate)
    promoted, reason = decide(candidate_score, serving_score, gate)
    # the threshold it serves at: chosen on every honest prediction of the candidate's stand-ins
    # (in a cross-validation round, every task the fold models' starting point did not see)
    threshold_score = candidate_score
    honest = [i for i in range(len(labeled)) if keys[i] not in init_seen]
    if mode != "validation slice" and len(honest) > len(val_index):
        threshold_score = _score(
            [gts_all[i] for i in honest], [fold_preds_all[i] for i in honest], labels, gate
        )
    threshold = threshold_score.best_threshold
    calibration: CountMatch | None = None
    if fold_on_unlabeled and candidate_on_unlabeled:
        calibration = count_matched_threshold(
            fold_on_unlabeled, candidate_on_unlabeled, threshold, floor=gate.score_floor
        )
        threshold = calibration.threshold
    outcome = RoundOutcome(
        directory=Path(directory),
        candidate=candidate,
        promoted=promoted,
        reason=reason,
        candidate_score=candidate_score,
        serving_score=serving_score,
        threshold=threshold,
        serves_boxes=threshold_score.serves_boxes,
        input_hw=hw,
        n_train=n_train,
        n_validation=len(val_index),
        mode=mode,
        calibration=calibration,
        # a warm start carries what its starting point saw
        trained_on=tuple(dict.fromkeys([*trained_on, *init_trained_on])),
    )
    record = {
        **metadata,
        "input_hw": list(hw),
        "train_config": train_config.to_dict(),
        "gate": gate.to_dict(),
        "stage": "final",
        "trained_on": list(outcome.trained_on),
        **outcome.metrics(),
    }
    if mode == "validation slice":  # the scored export is the candidate: record, don't re-export
        update_metadata(directory, **record)
    else:
        save_model_version(candidate, directory, record)
    log.info("%s: %s (%s)", metadata.get("version"), outcome.metrics()["status"], reason)
    return outcome
