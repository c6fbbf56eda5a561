"""The one interface the service, the CLI and the benchmark use to get boxes out of a model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from PIL import Image

from backend.boxes import Boxes

__all__ = ["Detector"]


@runtime_checkable
class Detector(Protocol):
    """Anything that predicts boxes for a project's labels.

    Attributes:
        labels: names of the label indices the returned ``Boxes`` use.
        version: the model version to report to Label Studio (e.g. ``boxloop-p3-v2``).

    ``predict`` returns one :class:`Boxes` per image, in order, in that image's pixels, with
    ``scores`` set; images with no detection give an empty ``Boxes``.
    """

    labels: list[str]
    version: str

    def predict(self, images: Sequence[Image.Image]) -> list[Boxes]: ...
