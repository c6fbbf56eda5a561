"""Compositional sketch and box-layout search over a project's task pool.

The method of Black et al., "Compositional Sketch Search" (``docs/search.md``): a query canvas of
objects (box + strokes, or box + class name) is painted into a query tensor and encoded by f_t;
images are encoded from a frozen backbone's 7×7 map; both meet in one embedding, reduced by PCA
and held in a compact faiss index.
"""

from backend.search.encode import QueryEncoder
from backend.search.index import CompactIndex, IndexConfig, SearchHits, choose_factory, nlist_for
from backend.search.model import SearchModel, SearchModelConfig, load_search_model
from backend.search.query import QueryError, QueryObject, SearchQuery, parse_query
from backend.search.tensor import QUERY_SIZE, box_masks, paint_query_tensor, paint_query_tensors
from backend.search.train import (
    SketchSet,
    TrainConfig,
    TrainImage,
    train_object_encoder,
    train_search_model,
    train_spatial,
)

__all__ = [
    "QUERY_SIZE",
    "CompactIndex",
    "IndexConfig",
    "QueryEncoder",
    "QueryError",
    "QueryObject",
    "SearchHits",
    "SearchModel",
    "SearchModelConfig",
    "SearchQuery",
    "SketchSet",
    "TrainConfig",
    "TrainImage",
    "box_masks",
    "choose_factory",
    "load_search_model",
    "nlist_for",
    "paint_query_tensor",
    "paint_query_tensors",
    "parse_query",
    "train_object_encoder",
    "train_search_model",
    "train_spatial",
]
