"""Image features for queue ordering: ImgNet (pretrained CNN) and SimNet (trained on the pool).

See ``docs/ordering.md``. Vectors are computed with onnxruntime, stored per task and extractor
name in the :class:`~backend.store.Store`, and reused.
"""

from backend.features.base import FeatureExtractor, OnnxImageEncoder, export_onnx, preprocess
from backend.features.compute import FeatureReport, ImageLoader, compute_features
from backend.features.imgnet import (
    FEATURES_VERSION,
    TORCHVISION_ARCHS,
    ImgNetExtractor,
    WeightsNotFoundError,
    effnet_lite0_extractor,
    torchvision_extractor,
)
from backend.features.registry import EXTRACTOR_NAMES, make_extractor, onnx_cache_dir, simnet_dir
from backend.features.simnet import (
    SimNet,
    SimNetConfig,
    SimNetExtractor,
    lifted_structured_loss,
    load_simnet,
    split_halves,
    train_simnet,
)

__all__ = [
    "EXTRACTOR_NAMES",
    "FEATURES_VERSION",
    "TORCHVISION_ARCHS",
    "FeatureExtractor",
    "FeatureReport",
    "ImageLoader",
    "ImgNetExtractor",
    "OnnxImageEncoder",
    "SimNet",
    "SimNetConfig",
    "SimNetExtractor",
    "WeightsNotFoundError",
    "compute_features",
    "effnet_lite0_extractor",
    "export_onnx",
    "lifted_structured_loss",
    "load_simnet",
    "make_extractor",
    "onnx_cache_dir",
    "preprocess",
    "simnet_dir",
    "split_halves",
    "torchvision_extractor",
    "train_simnet",
]
