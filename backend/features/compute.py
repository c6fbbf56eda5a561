"""Compute a project's feature vectors once per task and extractor, and keep them in the store.

Vectors are stored under the extractor's ``name`` (which carries its version), so a call only
computes what is missing: new tasks, or everything after a change of network or weights. Images
are loaded in batches through the caller's loader; a task whose image fails is reported and
skipped (the ordering places such tasks last), it does not stop the others.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from backend.features.base import FeatureExtractor
from backend.store import Store

ImageLoader = Callable[[Mapping[str, Any]], Image.Image]


@dataclass
class FeatureReport:
    """What :func:`compute_features` did: task ids computed, reused (already stored), failed."""

    extractor: str
    computed: list[int] = field(default_factory=list)
    reused: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "extractor": self.extractor,
            "computed": len(self.computed),
            "reused": len(self.reused),
            "failed": {str(k): v for k, v in self.failed.items()},
        }


def compute_features(
    store: Store,
    project_id: int,
    extractor: FeatureExtractor,
    tasks: Sequence[tuple[int, Mapping[str, Any]]],
    image_loader: ImageLoader,
    *,
    batch_size: int = 32,
    progress: bool = True,
    on_batch: Callable[[int, int], None] | None = None,
) -> FeatureReport:
    """Store ``extractor`` vectors for every task in ``tasks`` (``(task_id, data)``) lacking one.

    ``image_loader(data)`` returns the task's image (e.g. ``backend.images.load_image`` on
    ``data[image_key]``); its exceptions are caught per task and reported in ``failed``.
    Vectors are written batch by batch, so an interruption loses at most one batch.
    ``on_batch(done, total)`` follows the tasks still to do; an exception it raises stops the
    work after the batch just stored.
    """
    report = FeatureReport(extractor.name)
    stored, _ = store.get_features(project_id, extractor.name, [t for t, _ in tasks])
    have = set(stored)
    todo = [(t, d) for t, d in tasks if t not in have]
    report.reused = [t for t, _ in tasks if t in have]
    done = 0
    with tqdm(
        total=len(todo),
        disable=not progress,
        desc=f"features {extractor.name}",
        unit="img",
        mininterval=1.0,
    ) as bar:
        for chunk in _chunks(todo, max(1, batch_size)):
            ids: list[int] = []
            images: list[Image.Image] = []
            for task_id, data in chunk:
                try:
                    images.append(image_loader(data))
                    ids.append(task_id)
                except Exception as exc:  # one bad image must not stop the pool
                    report.failed[task_id] = f"{type(exc).__name__}: {exc}"
            if images:
                vectors = extractor.extract(images, progress=False)
                store.put_features(project_id, extractor.name, zip(ids, vectors, strict=True))
                report.computed.extend(ids)
            bar.update(len(chunk))
            done += len(chunk)
            if on_batch is not None:
                on_batch(done, len(todo))
    return report


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for s in range(0, len(items), size):
        yield items[s : s + size]
