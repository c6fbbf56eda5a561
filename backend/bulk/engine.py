"""The in-process bulk engine: bounded concurrent image fetches, batched inference.

Why this shape: in a big project the images are the slow part (HTTP from Label Studio or a
bucket), and one slow image must not hold up the others. Fetches run on a thread pool with at
most ``fetch_concurrency`` in flight; images join the next batch in the order they *arrive*,
so a slow one only delays itself. Items are pulled lazily, so memory stays flat in the number
of tasks. onnxruntime releases the GIL, so fetching and decoding go on while a batch runs.

:class:`~backend.bulk.ray_engine.RayEngine` keeps the same contract on a Ray cluster.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Protocol

import httpx
from PIL import Image

from backend.bulk.batch import describe_error, run_batch
from backend.bulk.work import ItemResult, ModelSpec, WorkItem
from backend.images import ImageSource, load_image

__all__ = ["Engine", "InProcessEngine", "make_engine"]


class Engine(Protocol):
    """Runs a model over work items; yields one :class:`ItemResult` per item (any order)."""

    name: str

    def run(
        self, items: Iterable[WorkItem], spec: ModelSpec, source: ImageSource
    ) -> Iterator[ItemResult]: ...


class InProcessEngine:
    """The default engine: everything in this process (see module docstring)."""

    name = "local"

    def __init__(self, *, batch_size: int = 16, fetch_concurrency: int = 8) -> None:
        if batch_size < 1 or fetch_concurrency < 1:
            raise ValueError("batch_size and fetch_concurrency must be at least 1")
        self.batch_size = batch_size
        self.fetch_concurrency = fetch_concurrency

    def run(
        self, items: Iterable[WorkItem], spec: ModelSpec, source: ImageSource
    ) -> Iterator[ItemResult]:
        model = spec.load()
        todo = iter(items)
        with (
            httpx.Client(timeout=source.timeout_s, follow_redirects=False) as client,
            ThreadPoolExecutor(self.fetch_concurrency, thread_name_prefix="bulk-fetch") as pool,
        ):
            pending: dict[Future[Image.Image], WorkItem] = {}

            def top_up() -> None:
                room = self.fetch_concurrency - len(pending)
                for item in itertools.islice(todo, max(0, room)):
                    future = pool.submit(load_image, item.reference, source, client=client)
                    pending[future] = item

            ready: list[tuple[WorkItem, Image.Image]] = []
            top_up()
            while pending or ready:
                if pending:
                    done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                    for future in done:
                        item = pending.pop(future)
                        try:
                            ready.append((item, future.result()))
                        except Exception as exc:
                            yield ItemResult(item.task_id, error=describe_error(exc))
                    top_up()
                if len(ready) >= self.batch_size or (ready and not pending):
                    batch, ready = ready[: self.batch_size], ready[self.batch_size :]
                    yield from run_batch(model, [b[0] for b in batch], [b[1] for b in batch])


def make_engine(*, ray_address: str | None, batch_size: int, fetch_concurrency: int) -> Engine:
    """The in-process engine, or the Ray engine when a cluster address is given (Ray is an
    optional dependency: imported only then)."""
    if not ray_address:
        return InProcessEngine(batch_size=batch_size, fetch_concurrency=fetch_concurrency)
    from backend.bulk.ray_engine import RayEngine

    return RayEngine(ray_address, batch_size=batch_size, fetch_concurrency=fetch_concurrency)
