"""Speed, recall and size of the search index at 10k, 100k and 1M clustered vectors.

``python -m benchmark.search_index_speed [--sizes 10000 100000 1000000] [--dim 32]`` writes
``benchmark/results/search/index_speed.json`` and ``.md``. For each N: the factory string the
product picks (:func:`backend.search.choose_factory`), build seconds (training, adding, the
re-rank store), milliseconds a single query (1 thread, one query at a time, as the product
searches), recall@200 against exact flat search in the same process (and its ms a query), bytes
an image (index file, re-rank store and row → task-id map, as saved), and NDCG@200 of the compact
ranking with the exact cosine similarity as the graded gain (the exact top 200 is the ideal).

Vectors are a Gaussian mixture on the unit sphere (``--clusters`` centres, per-dimension spread
``--spread``): uniform random vectors would make every approximate index look broken. Queries
are fresh draws from the same mixture, not in the index.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from backend.search.index import CompactIndex, IndexConfig

OUT = Path("benchmark/results/search")


def clustered(n: int, d: int, clusters: int, spread: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` unit vectors from a mixture of ``clusters`` Gaussians (centres ~ N(0, I/d))."""
    centres = rng.normal(size=(clusters, d)).astype(np.float32) / np.sqrt(d)
    # cluster sizes vary (Zipf-like weights), as real pools do
    weights = 1.0 / np.arange(1, clusters + 1) ** 0.5
    assign = rng.choice(clusters, size=n, p=weights / weights.sum())
    out = np.empty((n, d), np.float32)
    step = 200_000
    for s in range(0, n, step):
        a = assign[s : s + step]
        x = centres[a] + rng.normal(size=(len(a), d)).astype(np.float32) * (spread / np.sqrt(d))
        out[s : s + step] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def _ndcg(found: np.ndarray, gains_exact_sorted: np.ndarray, gain_of: np.ndarray) -> float:
    k = len(gains_exact_sorted)
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    return float(
        (gain_of[: len(found)] * disc[: len(found)]).sum() / (gains_exact_sorted * disc).sum()
    )


def measure(
    n: int,
    d: int,
    config: IndexConfig,
    *,
    clusters: int,
    spread: float,
    queries: int,
    k: int,
    seed: int,
    nprobes: list[int],
    reranks: list[int],
    stores: list[str],
) -> list[dict[str, Any]]:
    load = [round(v, 2) for v in os.getloadavg()]
    rng = np.random.default_rng(seed)
    data = clustered(n + queries, d, clusters, spread, rng)
    x, q = data[:n], data[n:]
    faiss.omp_set_num_threads(1)
    exact = faiss.IndexFlatIP(d)
    exact.add(x)
    t = time.perf_counter()
    exact_scores, exact_ids = np.zeros((queries, k), np.float32), np.zeros((queries, k), np.int64)
    for i in range(queries):
        s, ids = exact.search(q[i : i + 1], k)
        exact_scores[i], exact_ids[i] = s[0], ids[0]
    flat_ms = 1000 * (time.perf_counter() - t) / queries
    del exact

    faiss.omp_set_num_threads(max(1, config.num_threads))
    variants: list[tuple[CompactIndex, str, float]] = []
    refine_base: tuple[CompactIndex, float] | None = None  # an IndexRefine to derive SQ stores
    for store in dict.fromkeys([config.store, *stores]):
        cfg = replace(config, store=store)  # type: ignore[arg-type]
        if refine_base is not None and not store.startswith("pq"):
            t = time.perf_counter()
            derived = _with_store(refine_base[0], x, store, cfg)
            variants.append((derived, store, refine_base[1] + time.perf_counter() - t))
            continue
        t = time.perf_counter()
        index = CompactIndex.build(x, config=cfg)
        seconds = time.perf_counter() - t
        variants.append((index, store, seconds))
        if index.exact:
            break
        if isinstance(index.index, faiss.IndexRefine):
            refine_base = (index, seconds)
    out = []
    for variant, store, seconds in variants:
        parts = variant.nbytes()
        out.append(
            {
                "n": n,
                "dim": d,
                "factory": variant.factory,
                "store": None if variant.exact else store,
                "build_s": round(seconds, 2),
                "flat_ms_per_query": round(flat_ms, 4),
                "loadavg_at_start": load,
                "bytes": parts,
                "bytes_per_image": round(sum(parts.values()) / n, 2),
                "searches": _searches(variant, x, q, k, exact_ids, exact_scores, nprobes, reranks),
            }
        )
    return out


_QT = {
    "sq4": faiss.ScalarQuantizer.QT_4bit,
    "sq6": faiss.ScalarQuantizer.QT_6bit,
    "sq8": faiss.ScalarQuantizer.QT_8bit,
    "fp16": faiss.ScalarQuantizer.QT_fp16,
}
_REFINE_NAME = {"sq4": "SQ4", "sq6": "SQ6", "sq8": "SQ8", "fp16": "SQfp16"}


def _with_store(
    index: CompactIndex, x: np.ndarray, store: str, config: IndexConfig
) -> CompactIndex:
    """The same trained OPQ + IVF + PQ codes with another re-rank store (what building with
    ``store=`` would give, without training the rest again)."""
    refine = faiss.IndexScalarQuantizer(x.shape[1], _QT[store])
    rng = np.random.default_rng(config.seed)
    refine.train(x[rng.choice(len(x), size=min(len(x), 200_000), replace=False)])
    refine.add(x)
    assert isinstance(index.index, faiss.IndexRefine)
    combined = faiss.IndexRefine(index.index.base_index, refine)
    factory = index.factory.rsplit(",Refine(", 1)[0] + f",Refine({_REFINE_NAME[store]})"
    out = CompactIndex(combined, factory, index.dim, replace(config, store=store), index.ids)  # type: ignore[arg-type]
    out._keep = (index, refine)  # type: ignore[attr-defined]  # faiss holds no references
    return out


def _searches(
    index: CompactIndex,
    x: np.ndarray,
    q: np.ndarray,
    k: int,
    exact_ids: np.ndarray,
    exact_scores: np.ndarray,
    nprobes: list[int],
    reranks: list[int],
) -> list[dict[str, Any]]:
    rows = []
    combos = [(p, r) for p in nprobes for r in reranks] if not index.exact else [(0, 0)]
    for nprobe, rerank in combos:
        if not index.exact:
            index.set_search(nprobe=nprobe, rerank=rerank)
        faiss.omp_set_num_threads(1)
        hits = []
        t = time.perf_counter()
        for i in range(len(q)):
            hits.append(index.search(q[i : i + 1], k)[0])
        ms = 1000 * (time.perf_counter() - t) / len(q)
        recall = float(
            np.mean(
                [len(np.intersect1d(h.ids, e)) / k for h, e in zip(hits, exact_ids, strict=True)]
            )
        )
        ndcgs = []
        for h, qi, es in zip(hits, q, exact_scores, strict=True):
            gains = np.clip(x[h.ids] @ qi, 0, None)  # exact cosine of what came back
            ndcgs.append(_ndcg(h.ids, np.clip(es, 0, None), gains))
        rows.append(
            {
                "nprobe": nprobe if not index.exact else None,
                "rerank": rerank if not index.exact else None,
                "ms_per_query": round(ms, 4),
                "recall_at_k": round(recall, 4),
                "ndcg_at_k": round(float(np.mean(ndcgs)), 4),
            }
        )
    return rows


def to_markdown(result: dict[str, Any]) -> str:
    k = result["k"]
    lines = [
        "# Search index: speed, recall and size",
        "",
        " · ".join(f"`{c}`" for c in result.get("commands") or [result["command"]])
        + f" · {result['machine']['platform']} · load average at start "
        f"{result['machine']['loadavg']} · single queries, 1 thread; exact = `IndexFlatIP` in the "
        "same process. Data: unit vectors from a mixture of "
        f"{result['clusters']} Gaussians (spread {result['spread']}), d = {result['dim']}; "
        f"{result['queries']} fresh queries.",
        "",
        f"| N | factory | store | nprobe | short list | build s | ms/query | exact ms/query | recall@{k} | "
        f"NDCG@{k} (gain = exact cosine) | bytes/image (index + store + ids) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        b = r["bytes"]
        parts = f"{r['bytes_per_image']} ({b['index'] / r['n']:.1f} + {b['rerank_store'] / r['n']:.1f} + {b['id_map'] / r['n']:.1f})"
        for s in r["searches"]:
            lines.append(
                f"| {r['n']:,} | `{r['factory']}` | {r['store'] or '–'} | {s['nprobe'] or '–'} | "
                f"{s['rerank'] or '–'} | "
                f"{r['build_s']} | {s['ms_per_query']} | {r['flat_ms_per_query']} | "
                f"{s['recall_at_k']} | {s['ndcg_at_k']} | {parts} |"
            )
    lines += [
        "",
        f"Goals at 1M: ≤ 1 ms a query, recall@{k} ≥ 0.95, ≤ 48 bytes an image with the re-rank "
        "store, NDCG within 2 % of exact.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--spread", type=float, default=0.5)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--rerank", type=int, nargs="+", default=[IndexConfig.rerank])
    parser.add_argument("--store", default=IndexConfig.store, help="the product's store")
    parser.add_argument(
        "--stores",
        nargs="+",
        default=["sq4", "sq8"],
        help="re-rank stores to compare (SQ stores after the first share its trained index)",
    )
    parser.add_argument("--flat-below", type=int, default=IndexConfig.flat_below)
    parser.add_argument("--threads", type=int, default=1, help="threads for building")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT / "index_speed")
    parser.add_argument(
        "--append", action="store_true", help="add rows to the results already in --out"
    )
    args = parser.parse_args(argv)
    config = replace(
        IndexConfig(),
        rerank=args.rerank,
        store=args.store,
        flat_below=args.flat_below,
        num_threads=args.threads,
    )
    rows: list[dict[str, Any]] = []
    commands: list[str] = []
    if args.append and args.out.with_suffix(".json").is_file():
        previous = json.loads(args.out.with_suffix(".json").read_text())
        rows = list(previous["rows"])
        commands = list(previous.get("commands") or [previous["command"]])
    for n in args.sizes:
        row = measure(
            n,
            args.dim,
            config,
            clusters=args.clusters,
            spread=args.spread,
            queries=args.queries,
            k=args.k,
            seed=args.seed,
            nprobes=args.nprobe,
            reranks=args.rerank,
            stores=args.stores,
        )
        for r in row:
            print(json.dumps(r), flush=True)
        rows.extend(row)
    result = {
        "command": "python -m benchmark.search_index_speed " + " ".join(argv or sys.argv[1:]),
        "commands": [
            *commands,
            "python -m benchmark.search_index_speed " + " ".join(argv or sys.argv[1:]),
        ],
        "dim": args.dim,
        "clusters": args.clusters,
        "spread": args.spread,
        "queries": args.queries,
        "k": args.k,
        "config": asdict(config),
        "rows": rows,
        "machine": {
            "platform": platform.platform(),
            "loadavg": [round(v, 2) for v in os.getloadavg()],
            "faiss": faiss.__version__,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(to_markdown(result))
    print(f"wrote {args.out.with_suffix('.json')} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
