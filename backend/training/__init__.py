"""Fine-tuning detectors on a project's annotations, and model versions on disk.

``train_detector(samples, labels, config, init=None, progress=None)`` returns the trained model;
``save_model_version`` / ``load_model_version`` write and read a version directory atomically
(implemented beside the detectors, which own the serialised form, and re-exported here).
"""

from backend.detectors.versions import load_model_version, read_metadata, save_model_version
from backend.training.config import TrainConfig
from backend.training.loop import ProgressFn, initial_model, train_detector
from backend.training.samples import ImageLike, TrainSample, load_sample_image, sample_target

__all__ = [
    "ImageLike",
    "ProgressFn",
    "TrainConfig",
    "TrainSample",
    "initial_model",
    "load_model_version",
    "load_sample_image",
    "read_metadata",
    "sample_target",
    "save_model_version",
    "train_detector",
]
