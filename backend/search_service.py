"""Sketch and box-layout search over a project's tasks: store → features → index → results.

The orchestration side of :mod:`backend.search` (which only sees typed values): it loads the
search model named by the settings, keeps one search vector per task in the feature store (under
an extractor name carrying the model's digest, so a retrained model never mixes with old
vectors), keeps a :class:`~backend.search.CompactIndex` per project on disk and adds tasks to it
as they arrive, answers queries, and can move the results to the front of the project's queue
through the stored order and the Label Studio push the ``order`` command uses.

Vectors are computed in a background job (:meth:`SearchService.index_in_background`), started
by ``POST /projects/{id}/search/index`` and, with ``BOXLOOP_SEARCH_INDEX_NEW_TASKS``, by every
``TASKS_CREATED`` webhook, so a large pool's first search does not wait for its backbone pass.
A search still computes whatever no job has, so it never answers from a partial pool.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from backend.errors import ServiceError
from backend.features import compute_features
from backend.features.base import OnnxImageEncoder
from backend.features.registry import onnx_cache_dir
from backend.images import ImageSource, load_image, task_image_loader
from backend.ordering.plan import OrderPlan, load_plan
from backend.ordering.ranks import ranks_for
from backend.ordering.strategies import SEARCH_ORDER
from backend.search import (
    CompactIndex,
    IndexConfig,
    QueryEncoder,
    QueryError,
    SearchModel,
    load_search_model,
    parse_query,
)
from backend.search.backbone import pooled_extractor, spatial_map_extractor
from backend.settings import Settings
from backend.store import Project, Store, latest_per_task

log = logging.getLogger(__name__)

__all__ = ["SearchExtractor", "SearchOutcome", "SearchService"]


class SearchExtractor:
    """A :class:`FeatureExtractor`: whole images → the model's index-space vectors."""

    def __init__(self, model: SearchModel, maps: OnnxImageEncoder) -> None:
        self.model = model
        self.maps = maps
        self.name = f"search_{model.digest}"
        self.dim = model.config.index_dim

    def extract(self, images: Iterable[Image.Image], progress: bool = True) -> np.ndarray:
        return self.model.reduce(self.model.encode_maps(self.maps.extract(images, progress)))


@dataclass(frozen=True)
class SearchOutcome:
    """What one search returned, and what it did to the queue."""

    project_id: int
    results: list[tuple[int, float]]
    model: str
    factory: str
    indexed: int
    without_features: list[int] = field(default_factory=list)
    moved_to_front: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "project": self.project_id,
            "results": [{"task": t, "score": round(s, 6)} for t, s in self.results],
            "model": self.model,
            "index": {"factory": self.factory, "count": self.indexed},
            "without_features": self.without_features,
            "moved_to_front": self.moved_to_front,
        }


class SearchService:
    """Searches projects; one instance per server (the model and encoders are loaded once)."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        image_source_for: Callable[[int], ImageSource],
        push_order: Callable[[int, OrderPlan], OrderPlan] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.image_source_for = image_source_for
        self.push_order = push_order
        self._lock = threading.Lock()
        self._model: SearchModel | None = None
        self._model_key: tuple[str, float] | None = None
        self._encoder: QueryEncoder | None = None
        self._extractor: SearchExtractor | None = None
        # one indexing job at a time, off the request path; its state per project for GET
        self._indexer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="boxloop-search")
        self._index_jobs: dict[int, Future[None]] = {}
        self._index_state: dict[int, dict[str, Any]] = {}
        self._closing = threading.Event()

    # ------------------------------------------------------------------ parts
    @property
    def model_dir(self) -> Path:
        return self.settings.search_model_dir or self.settings.data_dir / "search" / "model"

    def index_config(self) -> IndexConfig:
        s = self.settings
        return IndexConfig(
            flat_below=s.search_flat_below,
            nprobe=s.search_nprobe,
            rerank=s.search_rerank,
            store=s.search_rerank_store,
            num_threads=s.num_threads,
        )

    @property
    def model_path(self) -> Path:
        return self.model_dir / "search_model.pt"

    def _model_stamp(self) -> tuple[str, float]:
        """The model file and its mtime (a new mtime reloads it), or the 409 that says how to
        get a model."""
        try:
            return (str(self.model_path), self.model_path.stat().st_mtime)
        except FileNotFoundError:
            raise ServiceError(
                409,
                f"no search model in {self.model_dir}: train one with `boxloop search-train` "
                "or set BOXLOOP_SEARCH_MODEL_DIR",
            ) from None

    def _load(self) -> tuple[SearchModel, QueryEncoder, SearchExtractor]:
        """The model (reloaded when its file changes) and the encoders built on it."""
        key = self._model_stamp()
        if self._model is None or self._model_key != key:
            model = load_search_model(self.model_dir)
            cache = onnx_cache_dir(self.settings)
            threads = self.settings.num_threads
            self._encoder = QueryEncoder(model, pooled_extractor(cache, num_threads=threads))
            self._extractor = SearchExtractor(
                model, spatial_map_extractor(cache, num_threads=threads)
            )
            self._model, self._model_key = model, key
        assert self._encoder is not None and self._extractor is not None
        return self._model, self._encoder, self._extractor

    def labels(self) -> list[str]:
        """The class names the search model knows (409 without a model)."""
        with self._lock:
            return list(self._load()[0].labels)

    def _loader(
        self, project_id: int, image_key: str
    ) -> Callable[[Mapping[str, Any]], Image.Image]:
        return task_image_loader(self.image_source_for(project_id), image_key)

    def close(self) -> None:
        """Stop a running indexing job after its current batch (stored vectors are kept)."""
        self._closing.set()
        self._indexer.shutdown(wait=False, cancel_futures=True)

    def index_dir(self, project_id: int, extractor: str) -> Path:
        return self.settings.data_dir / "search" / "index" / str(int(project_id)) / extractor

    # ------------------------------------------------------------------ indexing
    def refresh_index(self, project_id: int) -> tuple[CompactIndex, list[int]]:
        """Vectors for every task lacking one, added to the project's index (built, or rebuilt
        when the collection outgrew its factory). Returns the index and the tasks whose image
        failed."""
        project = self._project(project_id)
        _, _, extractor = self._load()
        failed = self._compute_vectors(project, extractor)
        return self._update_index(project_id, extractor), failed

    def _project(self, project_id: int) -> Project:
        project = self.store.get_project(project_id)
        if project is None:
            raise ServiceError(404, f"project {project_id} is unknown to boxloop")
        return project

    def _compute_vectors(
        self,
        project: Project,
        extractor: SearchExtractor,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> list[int]:
        """Store a vector for each task lacking one; the tasks whose image failed."""
        report = compute_features(
            self.store,
            project.id,
            extractor,
            self.store.list_tasks(project.id),
            self._loader(project.id, project.image_key),
            batch_size=self.settings.feature_batch_size,
            progress=False,
            on_batch=on_batch,
        )
        return sorted(report.failed)

    def _update_index(self, project_id: int, extractor: SearchExtractor) -> CompactIndex:
        """Add the stored vectors the index lacks, save it and return it; rebuilt when a vector
        it holds changed or is gone (a task's image changed: the store dropped its vector).

        Why the fingerprints beside the index: it only ever added tasks it lacked, so a task
        whose image changed kept its old vector, and searches found the picture it had before.
        """
        ids, vectors = self.store.get_features(project_id, extractor.name)
        prints = dict(zip(ids, _fingerprints(vectors).tolist(), strict=True))
        directory = self.index_dir(project_id, extractor.name)
        config = self.index_config()
        index: CompactIndex | None = None
        saved = _load_fingerprints(directory)
        if (directory / "index.json").is_file() and saved is not None:
            index = CompactIndex.load(directory, config)
            if len(saved) != len(index) or any(prints.get(t) != p for t, p in saved.items()):
                index = None
        if index is not None:
            have = set(index.ids.tolist())
            new = [i for i, t in enumerate(ids) if t not in have]
            if new:
                index.add(vectors[new], np.asarray(ids)[new])
            if index.needs_rebuild() or len(index) != len(ids):
                index = None
        if index is None and len(ids):
            index = CompactIndex.build(vectors, np.asarray(ids), config)
        if index is None:
            raise ServiceError(
                409, f"project {project_id} has no task with a readable image to search"
            )
        index.save(directory)
        _save_fingerprints(directory, prints)
        return index

    def index_in_background(self, project_id: int) -> dict[str, Any]:
        """Start computing the vectors of ``project_id``'s tasks that lack one, then update its
        index, in the background; a job already queued or running is left to finish. Returns
        :meth:`index_state` (404 unknown project, 409 no search model)."""
        self._project(project_id)
        self._model_stamp()  # 409 without a model
        with self._lock:
            job = self._index_jobs.get(project_id)
            if job is None or job.done():
                self._index_state[project_id] = {"state": "queued"}
                self._index_jobs[project_id] = self._indexer.submit(self._index, project_id)
        return self.index_state(project_id)

    def tasks_created(self, project_id: int, _task_ids: list[int]) -> None:
        """TASKS_CREATED recorded tasks: index them in the background, when that is on and a
        search model exists (the server hooks this to the webhook while it runs)."""
        if self.settings.search_index_new_tasks and self.model_path.is_file():
            self.index_in_background(project_id)

    def index_state(self, project_id: int) -> dict[str, Any]:
        """The last indexing job's state: ``queued``, ``running`` (``done`` of ``todo`` images),
        ``done`` (``indexed`` tasks, ``failed`` images) or ``failed`` (``error``); ``idle``
        when none ran since the server started."""
        return {"project": project_id, **self._index_state.get(project_id, {"state": "idle"})}

    def _index(self, project_id: int) -> None:
        state = self._index_state[project_id]

        def on_batch(done: int, todo: int) -> None:
            state.update(done=done, todo=todo)
            if self._closing.is_set():
                raise InterruptedError("the server is stopping")

        try:
            state["state"] = "running"
            project = self._project(project_id)
            with self._lock:
                _, _, extractor = self._load()
            # the slow part, outside the lock: searches of other projects go on
            failed = self._compute_vectors(project, extractor, on_batch)
            with self._lock:
                index = self._update_index(project_id, extractor)
            state.update(state="done", indexed=len(index), failed=len(failed))
        except ServiceError as exc:
            state.update(state="failed", error=exc.message)
        except InterruptedError as exc:  # close(): the stored vectors stay for the next job
            state.update(state="failed", error=str(exc))
        except Exception as exc:  # reported in the state; the server keeps serving
            log.exception("indexing project %s for search failed", project_id)
            state.update(state="failed", error=f"{type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ searching
    def search(
        self, project_id: int, query: Any, k: int | None = None, front: bool = False
    ) -> SearchOutcome:
        """Top ``k`` tasks of ``project_id`` for ``query`` (its JSON form, see
        :func:`backend.search.parse_query`); ``front`` moves them to the front of the queue."""
        self._project(project_id)
        running = self._index_jobs.get(project_id)
        if running is not None:
            running.exception()  # wait: the search would compute the same vectors beside it
        with self._lock:
            model, encoder, _ = self._load()
            try:
                parsed = parse_query(query, labels=model.labels)
                vector = encoder.encode_index(parsed)
            except QueryError as exc:
                raise ServiceError(422, f"invalid query: {exc}") from None
            index, failed = self.refresh_index(project_id)
            index.set_search(nprobe=self.settings.search_nprobe)
            hits = index.search(vector, k or self.settings.search_top_k)[0]
            results = [(int(t), float(s)) for t, s in zip(hits.ids, hits.scores, strict=True)]
            moved = False
            if front and results:
                self.move_to_front(project_id, [t for t, _ in results])
                moved = True
            return SearchOutcome(
                project_id,
                results,
                f"search_{model.digest}",
                index.factory,
                len(index),
                failed,
                moved,
            )

    def move_to_front(self, project_id: int, task_ids: list[int]) -> OrderPlan:
        """Put ``task_ids`` first in the project's stored order (the rest keep their order)
        and push the new ranks to Label Studio the way ``boxloop order`` does."""
        old = load_plan(self.store, project_id)
        known = [t for t, _ in self.store.list_tasks(project_id)]
        held = set(known)  # an order made before a task was deleted in Label Studio still has it
        rest = [t for t in old.task_ids if t in held] if old is not None else known
        first = list(dict.fromkeys(task_ids))
        chosen = set(first)
        order = first + [t for t in rest if t not in chosen]
        placed = set(order)  # one set: built per task it made a 16k-task pool take 2 s
        order += [t for t in known if t not in placed]
        ranks = ranks_for(order)
        params: dict[str, Any] = dict(old.params) if old is not None else {}
        params.update(
            {
                "ranks": [ranks[t] for t in order],
                "distance": [None] * len(order),
                "search_front": first,
            }
        )
        params.setdefault("batch_size", self.settings.order_batch_size)
        strategy = old.strategy if old is not None else SEARCH_ORDER
        view_id = old.view_id if old is not None else None
        self.store.set_order(project_id, strategy, params, order, view_id=view_id)
        plan = OrderPlan(project_id, strategy, order, ranks, [None] * len(order), params, view_id)
        if self.push_order is not None:
            plan = self.push_order(project_id, plan)
        return replace(plan)


# ---------------------------------------------------------------------- training from a project
def sketch_files(directory: Path, labels: list[str], column: str | None = None) -> dict[Path, str]:
    """Quick, Draw! ndjson files for ``labels``, each with its label: ``<label>.ndjson`` anywhere
    under ``directory`` (any case), and, with a ``category_map.tsv`` there (columns ``file`` and
    ``column``, as the shared sketches have), every file whose row names a label.

    A row naming a label whose file is not there (a partial copy of the folder) is a
    :class:`ServiceError` 422 listing every such file: training read the files after its pass
    over the images, and stopped there with a traceback."""
    import csv

    directory = Path(directory)
    lower = {label.lower(): label for label in labels}
    out: dict[Path, str] = {}
    for path in sorted(directory.rglob("*.ndjson")):
        label = lower.get(path.stem.lower())
        if label is not None:
            out[path] = label
    table = directory / "category_map.tsv"
    missing: list[str] = []
    if column and table.is_file():
        with table.open() as fh:
            for row in csv.DictReader(fh, delimiter="\t"):
                label = lower.get((row.get(column) or "").lower())
                if label is not None and row.get("file"):
                    path = directory / row["file"]
                    if path.is_file():
                        out[path] = label
                    else:
                        missing.append(f"{row['file']} ({label})")
    if missing:
        raise ServiceError(
            422,
            f"{table} names {len(missing)} sketch file(s) of the project's labels that are not "
            f"in {directory}: {', '.join(missing)}",
        )
    return out


def train_from_project(
    settings: Settings,
    store: Store,
    project_id: int,
    image_source: ImageSource,
    sketch_dir: Path,
    *,
    map_column: str | None = None,
    sketches_per_file: int = 25,
    out: Path | None = None,
    config: Any = None,
) -> Path:
    """Train a search model on a project's annotated tasks (boxes only) and sketches.

    ``sketch_dir``: Quick, Draw! ndjson files named by the project's labels, or a folder with a
    ``category_map.tsv`` whose ``map_column`` names them. Returns the model directory.
    """
    from backend.search import SketchSet, TrainConfig, TrainImage, train_search_model
    from backend.search.sketch import load_quickdraw, render_strokes

    project = store.get_project(project_id)
    if project is None:
        raise ServiceError(404, f"project {project_id} is unknown to boxloop")
    labels = list(project.labels)
    index = {label: i for i, label in enumerate(labels)}
    # the sketch files first: a missing one is told before the long pass over the images
    files = sketch_files(sketch_dir, labels, map_column)
    if not files:
        raise ServiceError(409, f"no sketch in {sketch_dir} names a label of project {project_id}")
    data = dict(store.list_tasks(project_id))
    cache = onnx_cache_dir(settings)
    maps_x = spatial_map_extractor(cache, num_threads=settings.num_threads)
    pooled_x = pooled_extractor(cache, num_threads=settings.num_threads)
    images: list[TrainImage] = []
    # the newest annotation of each task, as detector training takes: one per annotator made
    # copies of an image, each a backbone pass and a "different" image to the contrastive loss
    for annotation in latest_per_task(store.list_annotations(project_id)):
        if annotation.boxes is None or annotation.task_id not in data:
            continue
        boxes = annotation.boxes.kept()
        if not len(boxes):
            continue
        reference = data[annotation.task_id].get(project.image_key)
        if not isinstance(reference, str):
            continue
        try:
            image = load_image(reference, image_source)
        except Exception as exc:  # one unreadable image must not stop training
            log.warning("search training: task %s skipped: %s", annotation.task_id, exc)
            continue
        w, h = image.size
        boxes = boxes.in_frame((w, h))  # drawn on another copy of the image (original_width)
        crops = [
            image.crop((float(x0), float(y0), max(float(x1), x0 + 1), max(float(y1), y0 + 1)))
            for x0, y0, x1, y1 in boxes.xyxy
        ]
        images.append(
            TrainImage(
                maps_x.extract([image], progress=False)[0],
                np.clip(boxes.xyxy / np.array([w, h, w, h], np.float32), 0, 1),
                boxes.labels.astype(np.int64),
                pooled_x.extract(crops, progress=False),
            )
        )
    if len(images) < 2:
        raise ServiceError(409, f"project {project_id} has fewer than 2 annotated images")
    boxed = {labels[int(i)] for image in images for i in image.labels.tolist()}
    if len(boxed) < 2:
        raise ServiceError(
            409,
            f"project {project_id}'s annotations hold boxes of {len(boxed)} label(s) "
            f"({', '.join(sorted(boxed))}); the search model learns to tell at least two apart",
        )
    strokes, s_labels = [], []
    for path, label in files.items():
        try:
            drawings = load_quickdraw(path, limit=sketches_per_file)
        except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as exc:
            raise ServiceError(
                422,
                f"{path} is not a Quick, Draw! simplified ndjson file (one JSON object with a "
                f"'drawing' per line): {type(exc).__name__}: {exc}",
            ) from None
        for drawing in drawings:
            strokes.append(drawing)
            s_labels.append(index[label])
    if not strokes:
        raise ServiceError(409, f"no sketch in {sketch_dir} names a label of project {project_id}")
    sketches = SketchSet(
        pooled_x.extract([render_strokes(s) for s in strokes], progress=False),
        np.asarray(s_labels, np.int64),
    )
    config = config or TrainConfig(num_threads=settings.num_threads)
    model = train_search_model(labels, images, sketches, config)
    target = out or settings.search_model_dir or settings.data_dir / "search" / "model"
    return model.save(target)


_FINGERPRINTS = "fingerprints.npz"


def _fingerprints(vectors: np.ndarray) -> np.ndarray:
    """One uint64 per row of ``vectors`` that changes when any bit of the row does: the
    float32 words times fixed odd numbers, summed modulo 2^64 (exact, whatever the BLAS)."""
    words = np.ascontiguousarray(vectors, np.float32).view(np.uint32).astype(np.uint64)
    odd = np.random.default_rng(0).integers(1, 2**63, size=words.shape[1], dtype=np.uint64) | 1
    return (words * odd).sum(axis=1, dtype=np.uint64)


def _save_fingerprints(directory: Path, prints: Mapping[int, int]) -> None:
    ids = np.fromiter(prints.keys(), np.int64, len(prints))
    values = np.fromiter(prints.values(), np.uint64, len(prints))
    tmp = directory / f".{_FINGERPRINTS}"
    with tmp.open("wb") as fh:
        np.savez(fh, ids=ids, prints=values)
    tmp.replace(directory / _FINGERPRINTS)


def _load_fingerprints(directory: Path) -> dict[int, int] | None:
    """The fingerprints of the vectors the saved index holds; None when unknown (an index saved
    before they were kept is rebuilt once)."""
    try:
        with np.load(directory / _FINGERPRINTS) as saved:
            return dict(zip(saved["ids"].tolist(), saved["prints"].tolist(), strict=True))
    except (OSError, KeyError, ValueError):
        return None
