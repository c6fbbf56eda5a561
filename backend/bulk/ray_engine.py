"""The Ray engine: bulk prediction and feature extraction as Ray Data batch inference.

Same contract as :class:`~backend.bulk.engine.InProcessEngine` (one :class:`ItemResult` per
item, any order), on a cluster:

* the work items go into the object store as small Arrow blocks (task_id, reference), put
  chunk by chunk while the items are read, so the driver never holds a list of them;
* ``map_batches`` runs a pool of actors; each loads ``spec.load()`` once (one onnxruntime
  session, one intra-op thread, one CPU reserved) and, per batch, fetches the images on a
  bounded thread pool with the very same :func:`~backend.images.load_image` and
  :func:`~backend.bulk.batch.describe_error` as the in-process engine, then runs
  :func:`~backend.bulk.batch.run_batch` (one-by-one fallback included);
* outputs are Arrow-friendly (``task_id`` int64, ``payload`` pickled bytes, ``error``
  string) and stream back to the driver with ``iter_batches``, which unpickles them into
  :class:`ItemResult` as they come; nothing is ever collected with ``take_all``.

Fault tolerance: actors restart (``max_restarts=-1``) and their in-flight batches are retried
(``max_task_retries=-1``) when a worker process or node dies; the driver drops any result
whose task_id it has already yielded, so a retried batch never yields an item twice, and
checks at the end that every task came back.

Nodes must be able to import ``backend`` (boxloop installed with its ``ray`` extra, or a
``runtime_env`` with ``py_modules``), read the model files at the spec's paths, and read the
images (Label Studio URL + token in the :class:`~backend.images.ImageSource`, or shared
storage under its allowed local roots). See ``docs/scale.md``.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pyarrow as pa

from backend.bulk.batch import describe_error, run_batch
from backend.bulk.work import ItemResult, ModelSpec, WorkItem
from backend.images import ImageSource, load_image

__all__ = ["RayEngine"]

log = logging.getLogger(__name__)

_INPUT_SCHEMA = pa.schema([("task_id", pa.int64()), ("reference", pa.string())])
_OUTPUT_SCHEMA = pa.schema(
    [("task_id", pa.int64()), ("payload", pa.binary()), ("error", pa.string())]
)


class RayBatchRunner:
    """The actor-side callable of ``map_batches``: one loaded model per actor, a batch of
    (task_id, reference) rows in, a batch of (task_id, payload, error) rows out.

    Never raises for a task's fault: a failed fetch, a broken image or a model error becomes
    that row's ``error``, so one bad task cannot fail (and endlessly retry) a whole block.
    """

    def __init__(self, spec: ModelSpec, source: ImageSource, fetch_concurrency: int) -> None:
        self.model = spec.load()
        self.source = source
        self.client = httpx.Client(timeout=source.timeout_s, follow_redirects=False)
        self.pool = ThreadPoolExecutor(fetch_concurrency, thread_name_prefix="ray-fetch")

    def __call__(self, batch: pa.Table) -> pa.Table:
        items = [
            WorkItem(int(t), str(r))
            for t, r in zip(
                batch.column("task_id").to_pylist(),
                batch.column("reference").to_pylist(),
                strict=True,
            )
        ]
        futures = [
            self.pool.submit(load_image, item.reference, self.source, client=self.client)
            for item in items
        ]
        loaded, images, results = [], [], []
        for item, future in zip(items, futures, strict=True):
            try:
                images.append(future.result())
                loaded.append(item)
            except Exception as exc:
                results.append(ItemResult(item.task_id, error=describe_error(exc)))
        if loaded:
            results.extend(run_batch(self.model, loaded, images))
        return _encode(results)


def _encode(results: list[ItemResult]) -> pa.Table:
    ids, payloads, errors = [], [], []
    for result in results:
        payload, error = None, result.error
        if result.ok:
            try:
                payload = pickle.dumps(result.value, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as exc:
                error = describe_error(exc)
        ids.append(result.task_id)
        payloads.append(payload)
        errors.append(error)
    return pa.Table.from_pydict(
        {"task_id": ids, "payload": payloads, "error": errors}, schema=_OUTPUT_SCHEMA
    )


def _with_threads(spec: ModelSpec, threads: int) -> ModelSpec:
    """``spec`` with onnxruntime's intra-op threads set to what the actor reserved (specs
    without a ``num_threads`` field are sent as they are)."""
    if dataclasses.is_dataclass(spec) and any(
        f.name == "num_threads" for f in dataclasses.fields(spec)
    ):
        return dataclasses.replace(spec, num_threads=threads)  # type: ignore[type-var]
    return spec


def quiet_ray_logging() -> None:
    """Keep Ray's INFO chatter (dataset plans, progress bars) out of logs and test output."""
    for name in ("ray", "ray.data", "ray._private", "ray.util"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # It warns that progress bars are off, which is what we asked for.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


class RayEngine:
    """Runs a :class:`ModelSpec` over work items on a Ray cluster (see module docstring).

    Args:
        address: what ``ray.init`` takes: ``auto``, ``host:port`` of the GCS on a cluster
            node, or ``ray://head:10001`` (Ray Client; needs ``ray[client]``).
        batch_size: images per model call (and per actor task).
        fetch_concurrency: image fetches in flight per actor.
        actors: size of the actor pool. Default: the cluster's CPUs divided by
            ``threads_per_actor``, so every CPU runs one single-threaded onnxruntime
            session -- no oversubscription, and one dead worker loses one CPU's batch only.
        threads_per_actor: CPUs each actor reserves, and onnxruntime's intra-op threads.
        block_rows: work items per input block; the pool hands out whole blocks, so blocks
            much smaller than ``N / actors`` keep all actors busy to the end.
        runtime_env: passed to ``ray.init`` (e.g. ``{"py_modules": [...]}`` on a cluster
            whose nodes lack this boxloop).
    """

    name = "ray"

    def __init__(
        self,
        address: str,
        *,
        batch_size: int = 16,
        fetch_concurrency: int = 8,
        actors: int | None = None,
        threads_per_actor: int = 1,
        block_rows: int = 128,
        runtime_env: dict[str, Any] | None = None,
    ) -> None:
        if min(batch_size, fetch_concurrency, threads_per_actor, block_rows) < 1:
            raise ValueError("batch_size, fetch_concurrency, threads_per_actor, block_rows >= 1")
        if actors is not None and actors < 1:
            raise ValueError("actors must be at least 1")
        self.address = address
        self.batch_size = batch_size
        self.fetch_concurrency = fetch_concurrency
        self.actors = actors
        self.threads_per_actor = threads_per_actor
        self.block_rows = block_rows
        self.runtime_env = runtime_env

    def _connect(self) -> None:
        import ray

        quiet_ray_logging()
        if not ray.is_initialized():
            ray.init(
                address=self.address,
                ignore_reinit_error=True,
                logging_level=logging.WARNING,
                log_to_driver=False,
                runtime_env=self.runtime_env,
            )
        ctx = ray.data.DataContext.get_current()
        quiet_ray_logging()  # importing ray.data installs its own logging config
        ctx.enable_progress_bars = False
        ctx.enable_operator_progress_bars = False
        ctx.print_on_execution_start = False

    def pool_size(self) -> int:
        """The actor pool's size (connects to the cluster)."""
        import ray

        self._connect()
        if self.actors is not None:
            return self.actors
        cpus = int(ray.cluster_resources().get("CPU", 1))
        return max(1, cpus // self.threads_per_actor)

    def _put_items(self, items: Iterable[WorkItem]) -> tuple[list[Any], int]:
        """Items into the object store, one Arrow block per ``block_rows`` as they are read."""
        import ray

        refs: list[Any] = []
        count = 0
        ids: list[int] = []
        references: list[str] = []

        def flush() -> None:
            table = pa.Table.from_pydict(
                {"task_id": ids, "reference": references}, schema=_INPUT_SCHEMA
            )
            refs.append(ray.put(table))
            ids.clear()
            references.clear()

        for item in items:
            ids.append(int(item.task_id))
            references.append(str(item.reference))
            count += 1
            if len(ids) >= self.block_rows:
                flush()
        if ids:
            flush()
        return refs, count

    def run(
        self, items: Iterable[WorkItem], spec: ModelSpec, source: ImageSource
    ) -> Iterator[ItemResult]:
        import ray

        actors = self.pool_size()
        refs, count = self._put_items(items)
        if not refs:
            return
        # Restarts and retries: Ray Data's actor pools default to max_restarts=-1 and
        # max_task_retries=-1 (ActorPoolMapOperator); passing them as map_batches kwargs is
        # deprecated since Ray 2.60, so the defaults are relied upon (and tested by killing
        # an actor mid-run in tests/integration/test_ray_engine.py).
        dataset = ray.data.from_arrow_refs(refs).map_batches(
            RayBatchRunner,
            fn_constructor_args=(
                _with_threads(spec, self.threads_per_actor),
                source,
                self.fetch_concurrency,
            ),
            batch_size=self.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=self.threads_per_actor,
        )
        del refs  # the dataset holds them now
        seen: set[int] = set()
        duplicates = 0
        for out in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            batch: pa.Table = out  # type: ignore[assignment]
            for task_id, payload, error in zip(
                batch.column("task_id").to_pylist(),
                batch.column("payload").to_pylist(),
                batch.column("error").to_pylist(),
                strict=True,
            ):
                if task_id in seen:
                    duplicates += 1
                    continue
                seen.add(task_id)
                if error is not None:
                    yield ItemResult(task_id, error=error)
                else:
                    yield ItemResult(task_id, pickle.loads(payload))
        if duplicates:
            log.info("ray: dropped %d results of retried batches", duplicates)
        if len(seen) < count:
            # Only when the input repeats task ids (one result per id) or Ray lost rows.
            log.warning("ray: %d items sent, %d distinct task ids came back", count, len(seen))
