"""A compact faiss index of search embeddings, with a short-list re-rank and a disk layout.

Why this shape (figures in method-notes and ``benchmark/results/search/index_speed.md``):

- Below ``flat_below`` vectors (50k), exact search (``Flat``) costs well under a millisecond, so
  it is used as is: nothing to train, recall 1.
- Above it, ``OPQ16_{d'},IVF{nlist},PQ16+16``: an OPQ rotation, an IVF coarse quantizer with
  nlist ≈ 4√N (trained on ≥ 39·nlist vectors, as faiss asks) and 16-byte PQ codes, plus a
  **re-rank store** of 16 more bytes a vector: a second PQ of each vector's residual after the
  first (faiss ``IndexIVFPQR``; the paper's two-step quantisation, eq. 8, one step further). The
  PQ codes propose a short list (``rerank`` candidates); they are re-scored from both codes,
  which reconstruct the vector far more closely than either alone. Measured on clustered
  vectors: a 16-byte code alone, or a 4-bit scalar store (``Refine(SQ4)``, 16 bytes too), holds
  recall@200 near 0.85 whatever ``nprobe``; the residual PQ reaches ≥ 0.95 at the same size.
  ``store`` also offers ``sq4``, ``sq6``, ``sq8``, ``fp16`` (``IndexRefine`` over a
  scalar-quantised copy of the vectors).
- An image at 1M costs 16 (PQ) + 16 (residual PQ) + 8 (the IVF list's id) + 4 (row → task id)
  + ~0.5 (centroids, codebooks) ≈ 44.5 bytes, under the 48-byte goal.

The index is saved to a directory with its factory string, grows with :meth:`CompactIndex.add`
as tasks arrive (new vectors are encoded with the trained quantizers), and searches with a
configurable ``nprobe``. Vectors are expected L2-normalised; scores are cosine similarities
(from the re-rank distances).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

__all__ = [
    "CompactIndex",
    "IndexConfig",
    "SearchHits",
    "choose_factory",
    "nlist_for",
]

StoreKind = Literal["pq16", "sq4", "sq6", "sq8", "fp16"]
_REFINE = {"sq4": "SQ4", "sq6": "SQ6", "sq8": "SQ8", "fp16": "SQfp16"}
_INDEX_FILE = "index.faiss"
_IDS_FILE = "ids.npy"
_META_FILE = "index.json"


@dataclass(frozen=True)
class IndexConfig:
    """How the index is built and searched (settings ``BOXLOOP_SEARCH_*`` feed it)."""

    flat_below: int = 50_000
    pq_bytes: int = 16
    opq_dim: int = 64
    nprobe: int = 64
    rerank: int = 400
    store: StoreKind = "pq16"
    train_size: int = 0  # vectors to train on; 0: max(39·nlist, 64·256), capped at N
    opq_iterations: int = 20  # faiss' default 50 costs minutes of CPU at 40k vectors
    num_threads: int = 1
    seed: int = 0


def nlist_for(n: int) -> int:
    """IVF lists for ``n`` vectors: ≈ 4√n, rounded to a multiple of 8 (at least 8)."""
    return max(8, round(4 * math.sqrt(max(n, 1)) / 8) * 8)


#: The fewest vectors a compressed index trains on: its 8-bit PQ codebooks have 256 centroids
#: (faiss refuses fewer training points than centroids).
MIN_TRAIN = 256


def flat_below(config: IndexConfig) -> int:
    """Collections smaller than this are searched exactly: ``config.flat_below``, but never
    below :data:`MIN_TRAIN` (a lower setting made every search of a small pool a 500)."""
    return max(config.flat_below, MIN_TRAIN)


def choose_factory(n: int, d: int, config: IndexConfig | None = None) -> str:
    """The faiss ``index_factory`` string for ``n`` vectors of ``d`` dimensions."""
    config = config or IndexConfig()
    if n < flat_below(config):
        return "Flat"
    m = config.pq_bytes
    if d % m:
        raise ValueError(f"PQ{m} needs a dimension divisible by {m}, got {d}")
    out = max(m, min(config.opq_dim, d) // m * m)
    if config.store.startswith("pq"):  # residual PQ re-rank codes inside the IVF (IndexIVFPQR)
        return f"OPQ{m}_{out},IVF{nlist_for(n)},PQ{m}+{int(config.store[2:])}"
    return f"OPQ{m}_{out},IVF{nlist_for(n)},PQ{m}np,Refine({_REFINE[config.store]})"


@dataclass(frozen=True)
class SearchHits:
    """Top-k of one query: external ids and cosine scores, best first."""

    ids: np.ndarray
    scores: np.ndarray


class CompactIndex:
    """See the module docstring. Build with :meth:`build`, reopen with :meth:`load`.

    faiss numbers the vectors 0..N-1 in the order they were added; ``ids`` maps those rows to
    external ids (task ids).
    """

    def __init__(
        self, index: faiss.Index, factory: str, dim: int, config: IndexConfig, ids: np.ndarray
    ) -> None:
        self.index = index
        self.factory = factory
        self.dim = dim
        self.config = config
        self.ids = ids
        self._set_nprobe(config.nprobe)

    # ------------------------------------------------------------------ building
    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        ids: np.ndarray | None = None,
        config: IndexConfig | None = None,
        factory: str | None = None,
    ) -> CompactIndex:
        """Train (when the factory needs it) and fill an index with ``vectors`` ``(N, d)``.

        ``ids``: external ids (task ids), default ``0..N-1``; ``factory`` overrides the choice
        by size (:func:`choose_factory`).
        """
        config = config or IndexConfig()
        x = _as_matrix(vectors)
        n, d = x.shape
        faiss.omp_set_num_threads(max(1, config.num_threads))
        factory = factory or choose_factory(n, d, config)
        index = faiss.index_factory(d, factory)
        _limit_opq(index, config.opq_iterations)
        if not index.is_trained:
            rng = np.random.default_rng(config.seed)
            ivf = faiss.extract_index_ivf(index)
            want = config.train_size or max(39 * ivf.nlist, 64 * 256)
            sample = x[rng.choice(n, size=min(n, want), replace=False)] if want < n else x
            index.train(sample)
        built = cls(index, factory, d, config, np.zeros(0, np.int64))
        built.add(x, ids)
        return built

    @property
    def exact(self) -> bool:
        """True when the index itself is exact (no coarse quantizer, no re-rank store)."""
        return "IVF" not in self.factory

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def add(self, vectors: np.ndarray, ids: np.ndarray | None = None) -> None:
        """Append vectors (as tasks arrive); the quantizers trained at build time encode them."""
        x = _as_matrix(vectors)
        if x.shape[1] != self.dim:
            raise ValueError(f"index holds {self.dim}-d vectors, got {x.shape[1]}-d")
        start = len(self)
        new_ids = np.arange(start, start + len(x)) if ids is None else np.asarray(ids)
        if len(new_ids) != len(x):
            raise ValueError(f"{len(x)} vectors but {len(new_ids)} ids")
        self.index.add(x)
        self.ids = np.concatenate([self.ids.astype(np.int64), new_ids.astype(np.int64)])

    def needs_rebuild(self) -> bool:
        """True when the collection outgrew the factory it was built with (a flat index past
        ``flat_below``, or an IVF whose nlist is below half of ≈ 4√N)."""
        if self.exact:
            return len(self) >= flat_below(self.config)
        return faiss.extract_index_ivf(self.index).nlist < nlist_for(len(self)) / 2

    # ------------------------------------------------------------------ searching
    def _set_nprobe(self, nprobe: int) -> None:
        if not self.exact:
            faiss.extract_index_ivf(self.index).nprobe = max(1, int(nprobe))

    def set_search(self, nprobe: int | None = None, rerank: int | None = None) -> None:
        """Change ``nprobe`` and the short-list length for later searches."""
        if nprobe is not None:
            self.config = replace(self.config, nprobe=int(nprobe))
            self._set_nprobe(nprobe)
        if rerank is not None:
            self.config = replace(self.config, rerank=int(rerank))

    def search(self, queries: np.ndarray, k: int) -> list[SearchHits]:
        """Top ``k`` of each query (rows of ``(nq, d)``), cosine scores, best first."""
        q = _as_matrix(queries)
        if q.shape[1] != self.dim:
            raise ValueError(f"index holds {self.dim}-d vectors, got {q.shape[1]}-d queries")
        if len(self) == 0:
            return [SearchHits(np.zeros(0, np.int64), np.zeros(0, np.float32)) for _ in q]
        k = max(1, min(int(k), len(self)))
        reranker = self._reranker()
        if reranker is not None:
            # the short list: rerank candidates from the PQ codes, re-scored from the store
            reranker.k_factor = max(1.0, self.config.rerank / k)
        dist, rows = self.index.search(q, k)
        return [_hits(self.ids, r, 1.0 - 0.5 * dd) for r, dd in zip(rows, dist, strict=True)]

    def _reranker(self) -> Any:
        """The part holding the re-rank store and ``k_factor`` (IndexRefine or IndexIVFPQR)."""
        if isinstance(self.index, faiss.IndexRefine):
            return self.index
        if isinstance(self.index, faiss.IndexPreTransform):
            inner = faiss.downcast_index(self.index.index)  # owned by self.index
            if isinstance(inner, faiss.IndexIVFPQR):
                return inner
        return None

    # ------------------------------------------------------------------ size and disk
    def nbytes(self) -> dict[str, int]:
        """Bytes as saved: the index (codes, IVF ids, quantizers), the re-rank store, the
        row → task-id map."""
        store = 0
        index_bytes = int(faiss.serialize_index(self.index).nbytes)
        reranker = self._reranker()
        if isinstance(reranker, faiss.IndexRefine):
            store = int(faiss.serialize_index(reranker.refine_index).nbytes)
        elif reranker is not None:  # IndexIVFPQR: residual codes, one row per vector
            store = int(reranker.refine_codes.size())
        index_bytes -= store
        return {
            "index": index_bytes,
            "rerank_store": store,
            "id_map": int(len(self.ids) * _id_dtype(self.ids).itemsize),
        }

    def save(self, directory: Path) -> Path:
        """Write the index, the id map and ``index.json`` (with the factory string)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=directory, prefix=".save-"))
        faiss.write_index(self.index, str(tmp / _INDEX_FILE))
        np.save(tmp / _IDS_FILE, self.ids.astype(_id_dtype(self.ids)))
        meta = {
            "factory": self.factory,
            "dim": self.dim,
            "count": len(self),
            "config": asdict(self.config),
            "bytes": self.nbytes(),
        }
        (tmp / _META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        for name in (_INDEX_FILE, _IDS_FILE, _META_FILE):  # index.json last: it marks a save
            os.replace(tmp / name, directory / name)
        tmp.rmdir()
        return directory

    @classmethod
    def load(cls, directory: Path, config: IndexConfig | None = None) -> CompactIndex:
        """Reopen a saved index; ``config`` (e.g. another ``nprobe``) overrides the saved one,
        except the re-rank store kind, which is the saved index's."""
        directory = Path(directory)
        meta = json.loads((directory / _META_FILE).read_text())
        saved = IndexConfig(**meta["config"])
        config = replace(config or saved, store=saved.store)
        index = faiss.read_index(str(directory / _INDEX_FILE))  # already its concrete type
        ids = np.load(directory / _IDS_FILE).astype(np.int64)
        faiss.omp_set_num_threads(max(1, config.num_threads))
        return cls(index, meta["factory"], int(meta["dim"]), config, ids)


def _limit_opq(index: faiss.Index, iterations: int) -> None:
    """Fewer OPQ alternations (and at most 32k training points) than faiss' defaults."""
    if isinstance(index, faiss.IndexRefine):
        index = faiss.downcast_index(index.base_index)
    if not isinstance(index, faiss.IndexPreTransform):
        return
    chain: Any = index.chain
    for i in range(chain.size()):
        transform = faiss.downcast_VectorTransform(chain.at(i))
        if isinstance(transform, faiss.OPQMatrix):
            transform.niter = max(1, int(iterations))
            transform.max_train_points = min(int(transform.max_train_points), 32_768)


def _as_matrix(vectors: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    if x.ndim != 2 or not np.isfinite(x).all():
        raise ValueError("vectors must be a finite (N, d) array")
    return x


def _id_dtype(ids: np.ndarray) -> np.dtype:
    """int32 when every id fits (4 bytes an image), else int64."""
    if len(ids) == 0 or (ids.min() >= 0 and ids.max() < 2**31):
        return np.dtype(np.int32)
    return np.dtype(np.int64)


def _hits(ids: np.ndarray, rows: np.ndarray, scores: np.ndarray) -> SearchHits:
    keep = rows >= 0
    return SearchHits(ids[rows[keep]], scores[keep].astype(np.float32))
