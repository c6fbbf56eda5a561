"""The compact index on small generated clustered vectors: factory by size, recall, disk, growth."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from backend.search import CompactIndex, IndexConfig, choose_factory, nlist_for


def _clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(50, d))
    x = centres[rng.integers(0, 50, n)] + 0.3 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_factory_by_size() -> None:
    assert choose_factory(10_000, 32) == "Flat"
    assert choose_factory(49_999, 32) == "Flat"
    assert choose_factory(1_000_000, 32) == "OPQ16_32,IVF4000,PQ16+16"
    assert (
        choose_factory(1_000_000, 32, IndexConfig(store="sq4"))
        == "OPQ16_32,IVF4000,PQ16np,Refine(SQ4)"
    )
    assert (
        choose_factory(1_000_000, 256, IndexConfig(store="sq8"))
        == "OPQ16_64,IVF4000,PQ16np,Refine(SQ8)"
    )
    assert nlist_for(100_000) == 1264
    with pytest.raises(ValueError, match="divisible"):
        choose_factory(1_000_000, 40)


def test_flat_index_is_exact_and_maps_task_ids(tmp_path) -> None:  # type: ignore[no-untyped-def]
    x = _clustered(500, 16)
    ids = np.arange(500) * 7 + 3
    index = CompactIndex.build(x, ids)
    assert index.factory == "Flat" and index.exact
    hits = index.search(x[:2], 5)
    assert hits[0].ids[0] == 3 and hits[1].ids[0] == 10
    assert hits[0].scores[0] == pytest.approx(1.0, abs=1e-5)
    index.add(_clustered(10, 16, seed=1), np.arange(10) + 10_000)
    assert len(index) == 510
    index.save(tmp_path / "ix")
    again = CompactIndex.load(tmp_path / "ix")
    assert again.factory == "Flat" and len(again) == 510
    assert again.search(x[:1], 3)[0].ids.tolist() == index.search(x[:1], 3)[0].ids.tolist()
    assert again.nbytes()["id_map"] == 510 * 4


@pytest.mark.parametrize(
    ("store", "suffix", "store_bytes"), [("pq16", "PQ16+16", 16), ("sq8", "Refine(SQ8)", 32)]
)
def test_ivf_pq_with_rerank_store_keeps_recall_and_survives_disk(
    tmp_path, store, suffix, store_bytes
) -> None:  # type: ignore[no-untyped-def]
    x = _clustered(6000, 32)
    config = IndexConfig(flat_below=1000, nprobe=8, rerank=300, store=store, opq_iterations=5)
    index = CompactIndex.build(x, np.arange(6000) + 100, config)
    assert index.factory.startswith("OPQ16_32,IVF") and index.factory.endswith(suffix)
    assert not index.exact
    exact = CompactIndex.build(x, np.arange(6000) + 100, replace(config, flat_below=10**9))
    queries = _clustered(20, 32, seed=5)
    got = index.search(queries, 50)
    want = exact.search(queries, 50)
    recall = np.mean(
        [len(np.intersect1d(g.ids, w.ids)) / 50 for g, w in zip(got, want, strict=True)]
    )
    assert recall > 0.8
    # scores come from the re-rank store: close to the exact cosine
    assert np.allclose(got[0].scores[:5], want[0].scores[:5], atol=0.05)
    sizes = index.nbytes()
    assert 6000 * store_bytes <= sizes["rerank_store"] < 6000 * store_bytes + 1000
    index.save(tmp_path / "ivf")
    again = CompactIndex.load(tmp_path / "ivf", replace(config, nprobe=4))
    assert again.factory == index.factory
    assert again.config.nprobe == 4
    again.set_search(nprobe=8)
    assert (
        again.search(queries[:1], 10)[0].ids.tolist()
        == index.search(queries[:1], 10)[0].ids.tolist()
    )
    # grows as tasks arrive, new vectors findable
    extra = _clustered(5, 32, seed=9)
    again.add(extra, np.array([1, 2, 3, 4, 5]))
    assert again.search(extra[:1], 1)[0].ids.tolist() == [1]


def test_rebuild_is_due_when_the_collection_outgrows_its_factory() -> None:
    small = CompactIndex.build(_clustered(280, 16), config=IndexConfig(flat_below=300))
    assert not small.needs_rebuild()
    small.add(_clustered(60, 16, seed=2))
    assert small.needs_rebuild()


def test_a_pool_too_small_to_train_a_compressed_index_is_searched_exactly() -> None:
    """``flat_below`` under 256 made faiss train 256-centroid PQ codebooks on fewer points, and
    every search of a 16-task pool was a 500."""
    config = IndexConfig(flat_below=10)
    assert choose_factory(16, 32, config) == "Flat"
    assert choose_factory(255, 32, config) == "Flat"
    index = CompactIndex.build(_clustered(256, 32), config=config)
    assert not index.exact and len(index.search(_clustered(1, 32, seed=3), 5)[0].ids) == 5


def test_bad_vectors_are_refused() -> None:
    index = CompactIndex.build(_clustered(20, 16))
    with pytest.raises(ValueError, match="16-d"):
        index.add(np.zeros((1, 8), np.float32))
    with pytest.raises(ValueError, match="finite"):
        index.add(np.full((1, 16), np.nan, np.float32))
    with pytest.raises(ValueError, match="ids"):
        index.add(_clustered(2, 16), np.array([1]))
