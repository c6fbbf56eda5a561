"""The trained search model: its parts, how it encodes both sides, and how it is saved.

Why one object: the product, the CLI and the benchmark must encode queries and images the same
way; :class:`SearchModel` holds the three learned nets, the class list, and the linear reduction
from the 7×7×D search embedding E to the index's few dimensions (PCA fitted on the training
images' E, as method-notes asks: E itself is 392-d, far too wide for a compact index; the cost of
the reduction is measured by ``boxloop bench search``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from backend.nets.effnet_lite0 import POOLED_DIM
from backend.search.backbone import MAP_CHANNELS, MAP_SIDE
from backend.search.nets import ImageEncoder, ObjectEncoder, SpatialEncoder
from backend.search.tensor import paint_query_tensors

__all__ = ["MODEL_FILE", "SearchModel", "SearchModelConfig", "load_search_model"]

MODEL_FILE = "search_model.pt"
_META_FILE = "search_model.json"


@dataclass(frozen=True)
class SearchModelConfig:
    """Sizes of the search model.

    Attributes:
        object_dim: C, the single-object embedding's width (query tensor channels; paper 256).
        layout_channels: D of the 7×7×D search embedding E (E has 49·D dimensions).
        index_dim: dimensions kept by the PCA before the faiss index.
        hidden: width of f_t's and the image head's hidden layers.
    """

    object_dim: int = 64
    layout_channels: int = 8
    index_dim: int = 32
    hidden: int = 64

    @property
    def embedding_dim(self) -> int:
        return self.layout_channels * MAP_SIDE * MAP_SIDE


@dataclass
class SearchModel:
    """f_s / f_i / class embeddings, f_t, the image head, and the PCA to the index's space."""

    labels: list[str]
    config: SearchModelConfig
    objects: ObjectEncoder
    spatial: SpatialEncoder
    image: ImageEncoder
    pca_mean: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    pca_components: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    meta: dict[str, object] = field(default_factory=dict)

    @classmethod
    def create(cls, labels: Sequence[str], config: SearchModelConfig) -> SearchModel:
        n = len(labels)
        return cls(
            list(labels),
            config,
            ObjectEncoder(POOLED_DIM, config.object_dim, n),
            SpatialEncoder(config.object_dim, config.layout_channels, config.hidden),
            ImageEncoder(MAP_CHANNELS, config.layout_channels, n, config.hidden),
        )

    def eval(self) -> SearchModel:
        for net in (self.objects, self.spatial, self.image):
            net.eval()
        return self

    # ------------------------------------------------------------------ image side
    @torch.no_grad()
    def encode_maps(self, maps: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Backbone maps ``(N, 320·49)`` → E_I ``(N, 49·D)`` unit vectors."""
        self.eval()
        out = []
        for s in range(0, len(maps), batch_size):
            x = torch.from_numpy(np.asarray(maps[s : s + batch_size], np.float32))
            x = x.reshape(-1, MAP_CHANNELS, MAP_SIDE, MAP_SIDE)
            out.append(F.normalize(torch.flatten(self.image(x), 1), dim=1).numpy())
        if not out:
            return np.zeros((0, self.config.embedding_dim), np.float32)
        return np.concatenate(out).astype(np.float32)

    # ------------------------------------------------------------------ query side
    @torch.no_grad()
    def encode_objects(
        self, embeddings: np.ndarray | torch.Tensor, boxes: np.ndarray | torch.Tensor
    ) -> np.ndarray:
        """E_Q of one canvas: object embeddings ``(n, C)`` over boxes ``(n, 4)`` (canvas
        fractions) → the query tensor → f_t → ``(1, 49·D)`` unit vector."""
        self.eval()
        emb = torch.as_tensor(np.asarray(embeddings, np.float32))[None]
        box = torch.as_tensor(np.asarray(boxes, np.float32))[None]
        tensor = paint_query_tensors(emb, box)
        return F.normalize(torch.flatten(self.spatial(tensor), 1), dim=1).numpy()

    @torch.no_grad()
    def sketch_embeddings(self, pooled: np.ndarray) -> np.ndarray:
        """f_s of sketch rasters' pooled CNN features ``(n, 1280)`` → ``(n, C)``."""
        self.eval()
        return self.objects.f_s(torch.from_numpy(np.asarray(pooled, np.float32))).numpy()

    @torch.no_grad()
    def crop_embeddings(self, pooled: np.ndarray) -> np.ndarray:
        """f_i of image crops' (or whole images') pooled CNN features → ``(n, C)``."""
        self.eval()
        return self.objects.f_i(torch.from_numpy(np.asarray(pooled, np.float32))).numpy()

    @torch.no_grad()
    def class_embeddings(self, labels: Sequence[str]) -> np.ndarray:
        """The learned embeddings of class names (KeyError for an unknown one) → ``(n, C)``."""
        self.eval()
        index = {name: i for i, name in enumerate(self.labels)}
        ids = torch.as_tensor([index[name] for name in labels], dtype=torch.long)
        return self.objects.f_c(ids).numpy()

    # ------------------------------------------------------------------ the index's space
    def fit_reduction(self, embeddings: np.ndarray) -> None:
        """PCA of ``embeddings`` (the training images' E_I) to ``config.index_dim``."""
        x = np.asarray(embeddings, np.float64)
        mean = x.mean(axis=0)
        _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
        k = min(self.config.index_dim, vt.shape[0])
        components = np.zeros((self.config.index_dim, x.shape[1]))
        components[:k] = vt[:k]
        self.pca_mean = mean.astype(np.float32)
        self.pca_components = components.astype(np.float32)

    def reduce(self, embeddings: np.ndarray) -> np.ndarray:
        """E (``(N, 49·D)``) → the index's ``(N, index_dim)`` unit vectors."""
        if self.pca_components.size == 0:
            raise ValueError("the model has no fitted reduction (fit_reduction)")
        y = (np.asarray(embeddings, np.float32) - self.pca_mean) @ self.pca_components.T
        norms = np.linalg.norm(y, axis=1, keepdims=True)
        return (y / np.maximum(norms, 1e-12)).astype(np.float32)

    # ------------------------------------------------------------------ persistence
    def state(self) -> dict[str, object]:
        return {
            "objects": self.objects.state_dict(),
            "spatial": self.spatial.state_dict(),
            "image": self.image.state_dict(),
            "pca_mean": torch.from_numpy(self.pca_mean),
            "pca_components": torch.from_numpy(self.pca_components),
        }

    @property
    def digest(self) -> str:
        """A short digest of every weight and the class list: the version of the embeddings
        (stored vectors and indexes are keyed by it, so a retrained model never mixes in)."""
        h = hashlib.sha256(json.dumps([self.labels, asdict(self.config)]).encode())
        for part, value in self.state().items():
            tensors = value.items() if isinstance(value, dict) else [(part, value)]
            for key, tensor in sorted(tensors, key=lambda kv: str(kv[0])):
                h.update(str(key).encode())
                h.update(np.ascontiguousarray(torch.as_tensor(tensor).cpu().numpy()).tobytes())
        return h.hexdigest()[:12]

    def save(self, directory: Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(self.state(), directory / MODEL_FILE)
        meta = {
            "labels": self.labels,
            "config": asdict(self.config),
            "digest": self.digest,
            "meta": self.meta,
        }
        (directory / _META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        return directory


def load_search_model(directory: Path) -> SearchModel:
    """A model :meth:`SearchModel.save` wrote (FileNotFoundError naming what is missing)."""
    directory = Path(directory)
    meta_path = directory / _META_FILE
    if not meta_path.is_file() or not (directory / MODEL_FILE).is_file():
        raise FileNotFoundError(
            f"no search model in {directory} (expected {_META_FILE} and {MODEL_FILE}); "
            "train one with `boxloop search-train`"
        )
    meta = json.loads(meta_path.read_text())
    model = SearchModel.create(meta["labels"], SearchModelConfig(**meta["config"]))
    state = torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True)
    model.objects.load_state_dict(state["objects"])
    model.spatial.load_state_dict(state["spatial"])
    model.image.load_state_dict(state["image"])
    model.pca_mean = state["pca_mean"].numpy()
    model.pca_components = state["pca_components"].numpy()
    model.meta = dict(meta.get("meta") or {})
    return model.eval()
