"""Feature extraction for the orders through the bulk engines (in process or on Ray).

Only what is missing is computed (the ``features`` table is the ledger: one row per task and
extractor name, which carries the network's version), and vectors are stored batch by batch
as they stream back, so a run of any size keeps memory flat and an interruption loses at most
one batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from backend.bulk.engine import Engine
from backend.bulk.work import ModelSpec, WorkItem
from backend.features.compute import FeatureReport
from backend.images import ImageSource
from backend.store import Store

__all__ = ["extract_features"]


def extract_features(
    store: Store,
    project_id: int,
    spec: ModelSpec,
    items: Iterable[WorkItem],
    engine: Engine,
    source: ImageSource,
    *,
    write_batch: int = 256,
    total: int | None = None,
    progress: bool = True,
) -> FeatureReport:
    """Store ``spec``'s vector for every item lacking one; failures are reported per task."""
    report = FeatureReport(spec.name)

    def missing() -> Iterator[WorkItem]:
        for chunk in _chunks(items, 4096):
            have, _ = store.get_features(project_id, spec.name, [i.task_id for i in chunk])
            stored = set(have)
            for item in chunk:
                if item.task_id in stored:
                    report.reused.append(item.task_id)
                else:
                    yield item

    buffer: list[tuple[int, np.ndarray]] = []
    with tqdm(
        total=total, disable=not progress, desc=f"features {spec.name}", unit="img", mininterval=1
    ) as bar:
        for result in engine.run(missing(), spec, source):
            if result.ok:
                buffer.append((result.task_id, np.asarray(result.value, np.float32)))
                report.computed.append(result.task_id)
            else:
                report.failed[result.task_id] = str(result.error)
            if len(buffer) >= write_batch:
                store.put_features(project_id, spec.name, buffer)
                buffer = []
            bar.update(1)
        if buffer:
            store.put_features(project_id, spec.name, buffer)
    return report


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
