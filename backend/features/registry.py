"""Extractors by name, as settings and the CLI spell them.

``imgnet_effnet_lite0`` (default), ``imgnet_<arch>`` for a torchvision ImageNet classifier whose
checkpoint is on disk (``imgnet_resnet50``, the paper's ImgNet), and ``simnet`` (a SimNet trained
into a directory; see :func:`backend.features.simnet.train_simnet`). Short aliases: ``imgnet`` =
``imgnet_effnet_lite0``.
"""

from __future__ import annotations

from pathlib import Path

from backend.features.base import FeatureExtractor
from backend.features.imgnet import TORCHVISION_ARCHS, effnet_lite0_extractor, torchvision_extractor
from backend.features.simnet import load_simnet
from backend.settings import Settings

EXTRACTOR_NAMES: tuple[str, ...] = (
    "imgnet_effnet_lite0",
    *(f"imgnet_{arch}" for arch in TORCHVISION_ARCHS),
    "simnet",
)
_ALIASES = {"imgnet": "imgnet_effnet_lite0"}


def onnx_cache_dir(settings: Settings) -> Path:
    """Where exported ImgNet networks are cached (``<data_dir>/features/onnx``)."""
    return settings.features_dir / "onnx"


def simnet_dir(settings: Settings, project_id: int) -> Path:
    """The default directory of a project's SimNet (``<data_dir>/features/simnet/<project>``)."""
    return settings.features_dir / "simnet" / str(int(project_id))


def make_extractor(
    name: str, settings: Settings, *, simnet_directory: Path | None = None
) -> FeatureExtractor:
    """The extractor ``name`` (see module docstring), configured from ``settings``.

    ``simnet`` needs ``simnet_directory`` holding a trained SimNet (FileNotFoundError otherwise).
    Torchvision archs raise ``WeightsNotFoundError`` when their checkpoint is not on disk.
    """
    key = _ALIASES.get(name, name)
    kwargs = {"batch_size": settings.feature_batch_size, "num_threads": settings.num_threads}
    if key == "imgnet_effnet_lite0":
        return effnet_lite0_extractor(onnx_cache_dir(settings), **kwargs)
    if key.startswith("imgnet_") and key[len("imgnet_") :] in TORCHVISION_ARCHS:
        return torchvision_extractor(
            key[len("imgnet_") :],
            settings.torchvision_weights_dir,
            onnx_cache_dir(settings),
            **kwargs,
        )
    if key == "simnet":
        if simnet_directory is None:
            raise ValueError("the simnet extractor needs the directory it was trained into")
        return load_simnet(simnet_directory, **kwargs)
    raise ValueError(f"unknown feature extractor {name!r}; known: {', '.join(EXTRACTOR_NAMES)}")
