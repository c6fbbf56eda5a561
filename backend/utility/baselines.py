"""No-learning utility predictors that the CNN must beat, each a score plus a tuned threshold.

Why these: each stands for a shortcut a learnt predictor could take.

* :func:`jpeg_quality` reads the quality the JPEG **file** states in its quantization tables: the
  leak. On a JPEG test set it is nearly an oracle for "how compressed"; on the same pixels saved
  losslessly (PNG) it sees no tables and says nothing (quality 100 for every image).
* :func:`laplacian_variance`: sharpness, the classic blur detector.
* :func:`brisque_score`: a no-reference perceptual quality model (the PyPI ``brisque`` package, its
  SVR model shipped in the wheel: no download at run time). Lower is better quality.
* :class:`RandomFilter`: drops the same fraction of images at random, the floor any filter must
  clear.

:class:`ThresholdRule` tunes each score's threshold and direction for accuracy on the training
split only; the test split never moves it.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "RandomFilter",
    "ThresholdRule",
    "brisque_score",
    "jpeg_quality",
    "laplacian_variance",
]


@lru_cache(maxsize=1)
def _reference_tables() -> np.ndarray:
    """``(100, 64)``: Pillow's luminance table at each quality 1..100, in Pillow's own order."""
    tile = Image.new("RGB", (8, 8), (128, 128, 128))
    tables = []
    for quality in range(1, 101):
        buffer = io.BytesIO()
        tile.save(buffer, format="JPEG", quality=quality)
        with Image.open(buffer) as decoded:
            tables.append(np.asarray(decoded.quantization[0], np.float64))  # type: ignore[attr-defined]
    return np.stack(tables)


def jpeg_quality(image_or_bytes: Image.Image | bytes) -> float:
    """The IJG quality (1–100) whose luminance table is closest to the file's; 100 without tables.

    Accepts an opened JPEG (Pillow keeps ``image.quantization``) or the file's bytes. A decoded
    copy, a PNG or anything else without tables gives 100: nothing in the file says it lost
    anything, which is exactly why this baseline fails once the header is gone.
    """
    if isinstance(image_or_bytes, bytes | bytearray):
        with Image.open(io.BytesIO(image_or_bytes)) as opened:
            tables: Any = getattr(opened, "quantization", None)
    else:
        tables = getattr(image_or_bytes, "quantization", None)
    if not tables or 0 not in tables or len(tables[0]) != 64:
        return 100.0
    luma = np.asarray(tables[0], np.float64)
    error = np.abs(np.log(_reference_tables()) - np.log(np.maximum(luma, 1.0))).mean(axis=1)
    return float(np.argmin(error) + 1)


def _grey(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), np.float64)


def laplacian_variance(image: Image.Image) -> float:
    """Variance of the 4-neighbour Laplacian of the grey image (higher = sharper)."""
    grey = _grey(image)
    if grey.shape[0] < 3 or grey.shape[1] < 3:
        return 0.0
    lap = (
        grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:] - 4.0 * grey[1:-1, 1:-1]
    )
    return float(lap.var())


@lru_cache(maxsize=1)
def _brisque_model() -> Any:
    from brisque import BRISQUE  # the model ships in the wheel; url=False never downloads

    return BRISQUE(url=False)


def brisque_score(image: Image.Image, max_side: int | None = 512) -> float:
    """BRISQUE (``brisque`` package) of the RGB image; lower = better perceptual quality.

    ``max_side`` shrinks large images first (BRISQUE costs ~0.3 s at 640 px on this CPU); the
    shrink is recorded by the caller's settings so results compare like with like.
    """
    rgb = image.convert("RGB")
    if max_side is not None and max(rgb.size) > max_side:
        scale = max_side / max(rgb.size)
        rgb = rgb.resize(
            (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))),
            Image.Resampling.BILINEAR,
        )
    with warnings.catch_warnings():  # the package converts 1-element arrays with float()
        warnings.simplefilter("ignore", DeprecationWarning)
        score = float(_brisque_model().score(np.asarray(rgb)))
    return score if np.isfinite(score) else float("nan")


@dataclass(frozen=True)
class ThresholdRule:
    """Predict useful when ``sign * score ≥ sign * threshold``.

    Attributes:
        threshold: the cut, tuned on training scores.
        higher_is_useful: the direction (quality and sharpness: higher is useful; BRISQUE: lower).
        train_accuracy: accuracy on the split it was tuned on.
    """

    threshold: float
    higher_is_useful: bool
    train_accuracy: float

    @classmethod
    def fit(cls, scores: np.ndarray, labels: np.ndarray) -> ThresholdRule:
        """The threshold and direction with the best training accuracy (ties: the lower cut).

        ``nan`` scores count as the least useful value.
        """
        s = np.asarray(scores, np.float64)
        y = np.asarray(labels, np.int64)
        if len(s) != len(y) or not len(y):
            raise ValueError(f"need equal, non-empty scores and labels ({len(s)}, {len(y)})")
        best: tuple[float, float, bool] = (-1.0, 0.0, True)
        for higher in (True, False):
            # usefulness in this direction; nan the least useful in both (as :meth:`predict`)
            v = np.nan_to_num(s if higher else -s, nan=-np.inf)
            order = np.argsort(v, kind="stable")
            sorted_v, sorted_y = v[order], y[order]
            # cut before position i: predict 0 for [:i], 1 for [i:]
            zeros_before = np.concatenate([[0], np.cumsum(sorted_y == 0)])
            ones_after = np.concatenate([np.cumsum((sorted_y == 1)[::-1])[::-1], [0]])
            accuracy = (zeros_before + ones_after) / len(y)
            # only cuts between distinct values are realisable
            valid = np.ones(len(y) + 1, bool)
            valid[1:-1] = sorted_v[1:] != sorted_v[:-1]
            accuracy = np.where(valid, accuracy, -1.0)
            i = int(np.argmax(accuracy))
            if accuracy[i] > best[0]:
                if i == 0:
                    cut = -np.inf
                elif i == len(y):
                    cut = np.inf
                elif not np.isfinite(sorted_v[i - 1]):  # nan (or -inf) below, a value above:
                    cut = sorted_v[i]  # the midpoint would be -inf and let the nan ones through
                else:
                    cut = (sorted_v[i - 1] + sorted_v[i]) / 2.0
                best = (float(accuracy[i]), float(cut if higher else -cut), higher)
        return cls(threshold=best[1], higher_is_useful=best[2], train_accuracy=best[0])

    def predict(self, scores: np.ndarray) -> np.ndarray:
        """0/1 per score."""
        s = np.nan_to_num(np.asarray(scores, np.float64), nan=-np.inf)
        if self.higher_is_useful:
            return (s >= self.threshold).astype(np.int64)
        s = np.nan_to_num(np.asarray(scores, np.float64), nan=np.inf)
        return (s <= self.threshold).astype(np.int64)


@dataclass(frozen=True)
class RandomFilter:
    """Marks a fixed fraction of images non-useful at random (the floor for any filter)."""

    drop_fraction: float
    seed: int = 0

    def predict(self, count: int) -> np.ndarray:
        """0/1 for ``count`` images: exactly ``round(drop_fraction · count)`` zeros."""
        if not 0.0 <= self.drop_fraction <= 1.0:
            raise ValueError(f"drop_fraction must be within [0, 1], got {self.drop_fraction}")
        labels = np.ones(count, np.int64)
        drop = np.random.default_rng(self.seed).permutation(count)[
            : round(self.drop_fraction * count)
        ]
        labels[drop] = 0
        return labels
