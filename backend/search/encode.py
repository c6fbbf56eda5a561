"""Queries → search embeddings, the way the product and the benchmark both encode them.

A sketch object is drawn into its own raster (:func:`backend.search.sketch.object_raster`),
read by the frozen CNN (pooled features) and mapped by f_s; a class-only object takes its class
embedding. The objects are painted into the query tensor and f_t gives E_Q; :meth:`encode_index`
also applies the model's reduction to the index's space.
"""

from __future__ import annotations

import numpy as np

from backend.features.base import FeatureExtractor
from backend.search.model import SearchModel
from backend.search.query import QueryError, SearchQuery
from backend.search.sketch import object_raster

__all__ = ["QueryEncoder"]


class QueryEncoder:
    """Encodes :class:`SearchQuery` objects with one model and one pooled-feature extractor."""

    def __init__(self, model: SearchModel, pooled: FeatureExtractor) -> None:
        self.model = model
        self.pooled = pooled

    def object_embeddings(self, query: SearchQuery) -> np.ndarray:
        """``(n, C)``: f_s for sketch objects, the class embedding for class-only ones."""
        out = np.zeros((len(query.objects), self.model.config.object_dim), np.float32)
        sketch_rows = [i for i, o in enumerate(query.objects) if o.is_sketch]
        if sketch_rows:
            rasters = [object_raster(query.objects[i]) for i in sketch_rows]
            pooled = self.pooled.extract(rasters, progress=False)
            out[sketch_rows] = self.model.sketch_embeddings(pooled)
        class_rows = [i for i, o in enumerate(query.objects) if not o.is_sketch]
        if class_rows:
            names = [str(query.objects[i].label) for i in class_rows]
            unknown = sorted(set(names) - set(self.model.labels))
            if unknown:
                raise QueryError(
                    f"unknown class(es) {unknown}; the search model knows "
                    f"{', '.join(sorted(self.model.labels))}"
                )
            out[class_rows] = self.model.class_embeddings(names)
        return out

    def encode(self, query: SearchQuery) -> np.ndarray:
        """E_Q, ``(1, 49·D)`` unit vector."""
        boxes = np.asarray([o.box for o in query.objects], np.float32)
        return self.model.encode_objects(self.object_embeddings(query), boxes)

    def encode_index(self, query: SearchQuery) -> np.ndarray:
        """E_Q in the index's space, ``(1, index_dim)``."""
        return self.model.reduce(self.encode(query))
