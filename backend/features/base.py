"""The feature-extractor seam, image preprocessing, and the onnxruntime encoder behind it.

Why onnxruntime: on this CPU the same EfficientNet-Lite0 runs about 4× faster exported to ONNX
than in eager PyTorch (``docs/method-notes``), and extraction touches every image of a pool.
PyTorch stays for training (SimNet); a trained or pretrained torch module is exported once into a
cache directory, keyed by a digest of its weights, and reused.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence, Sized
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

__all__ = [
    "FeatureExtractor",
    "OnnxImageEncoder",
    "PixelInput",
    "export_onnx",
    "pixel_batch",
    "preprocess",
    "state_digest",
]


@runtime_checkable
class FeatureExtractor(Protocol):
    """Images → one vector each.

    ``name`` identifies the network, its weights and the preprocessing (it is the key under which
    vectors are stored, so a change of any of them must change the name); ``dim`` is the width.
    """

    name: str
    dim: int

    def extract(self, images: Iterable[Image.Image], progress: bool = True) -> np.ndarray:
        """``(N, dim)`` float32 vectors, in the order of ``images``."""
        ...


def pixel_batch(images: Iterable[Image.Image], size: tuple[int, int]) -> np.ndarray:
    """``(N, H, W, 3)`` uint8: RGB, bilinear resize of the *whole* image to ``size = (W, H)``
    (no crop: similarity is about the whole picture). The raw input of a :class:`PixelInput`
    graph, and the first half of :func:`preprocess`."""
    arrays = []
    for image in images:
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        if rgb.size != size:
            rgb = rgb.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
        arrays.append(np.asarray(rgb, dtype=np.uint8))
    if not arrays:
        return np.zeros((0, size[1], size[0], 3), np.uint8)
    return np.stack(arrays)


def preprocess(
    images: Iterable[Image.Image],
    size: tuple[int, int],
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
) -> np.ndarray:
    """``(N, 3, H, W)`` float32: :func:`pixel_batch`, scaled to [0, 1], then normalised."""
    batch = pixel_batch(images, size).astype(np.float32) * np.float32(1.0 / 255.0)
    batch -= np.asarray(mean, np.float32)
    batch /= np.asarray(std, np.float32)
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))


class PixelInput(nn.Module):
    """``module`` behind its own normalisation: uint8 ``(N, H, W, 3)`` pixels in.

    Why: on this 2-core CPU the float conversion, normalisation and transpose of a batch cost
    about 1.3 ms an image in numpy, on the helper thread that competes with onnxruntime's two
    threads; inside the exported graph they are one fused pass. ``(x / 255 - mean) / std`` is
    computed as ``x * (1 / (255 std)) - mean / std``: equal up to float rounding.
    """

    def __init__(
        self,
        module: nn.Module,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ) -> None:
        super().__init__()
        self.module = module
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.scale: torch.Tensor
        self.shift: torch.Tensor
        self.register_buffer("scale", 1.0 / (255.0 * std_t))
        self.register_buffer("shift", mean_t / std_t)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).float() * self.scale - self.shift
        return self.module(x)


def state_digest(module: nn.Module) -> str:
    """sha256 of a module's parameters and buffers (names, shapes, bytes): a weights version."""
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode())
        tensor = value.detach().cpu().contiguous()
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def export_onnx(
    module: nn.Module,
    path: Path,
    size: tuple[int, int],
    opset: int = 17,
    *,
    normalization: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None,
) -> Path:
    """Export ``module`` (images → vectors) to ``path`` once; atomic, batch axis dynamic.

    With ``normalization = (mean, std)`` the graph takes uint8 ``(N, H, W, 3)`` pixels and
    normalises them itself (:class:`PixelInput`); :class:`OnnxImageEncoder` sees the input's type
    and feeds it :func:`pixel_batch`. Without, it takes normalised float ``(N, 3, H, W)``.
    """
    path = Path(path)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    example = torch.zeros(2, 3, size[1], size[0])
    input_name = "images"
    if normalization is not None:
        module = PixelInput(module, *normalization).eval()
        example = torch.zeros(2, size[1], size[0], 3, dtype=torch.uint8)
        input_name = "pixels"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (example,),
                tmp,
                input_names=[input_name],
                output_names=["features"],
                dynamic_axes={input_name: {0: "batch"}, "features": {0: "batch"}},
                opset_version=opset,
                dynamo=False,
            )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


class OnnxImageEncoder:
    """A :class:`FeatureExtractor` running an exported image encoder with onnxruntime.

    Batches are preprocessed in a helper thread while the previous batch runs (onnxruntime
    releases the GIL), so decoding/resizing overlaps inference. onnxruntime's threads do not
    spin between operators, which leaves that helper a core (measured: 97 → 107 images/s for
    the utility predictor on 2 cores). A graph with a uint8 input (``export_onnx(...,
    normalization=...)``) gets raw pixels; an older float one gets :func:`preprocess`'s output.
    """

    def __init__(
        self,
        onnx_path: Path,
        *,
        name: str,
        dim: int,
        size: tuple[int, int] = (224, 224),
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] = (0.5, 0.5, 0.5),
        batch_size: int = 32,
        num_threads: int = 2,
    ) -> None:
        self.name = name
        self.dim = int(dim)
        self.size = size
        self.mean = mean
        self.std = std
        self.batch_size = max(1, int(batch_size))
        self.onnx_path = Path(onnx_path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, int(num_threads))
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(self.onnx_path), options, providers=["CPUExecutionProvider"]
        )
        graph_input = self.session.get_inputs()[0]
        self._input = graph_input.name
        self.takes_pixels = graph_input.type == "tensor(uint8)"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim})"

    def _batches(self, images: Iterable[Image.Image]) -> Iterator[list[Image.Image]]:
        batch: list[Image.Image] = []
        for image in images:
            batch.append(image)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def prepare(self, images: Sequence[Image.Image]) -> np.ndarray:
        """What :meth:`run` takes: uint8 pixels or normalised floats, as the graph expects."""
        if self.takes_pixels:
            return pixel_batch(images, self.size)
        return preprocess(images, self.size, self.mean, self.std)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Encode an already prepared batch (:meth:`prepare`)."""
        out = self.session.run(None, {self._input: batch})[0]
        return np.asarray(out, np.float32).reshape(len(batch), -1)

    def extract(self, images: Iterable[Image.Image], progress: bool = True) -> np.ndarray:
        total = len(images) if isinstance(images, Sized) else None
        chunks: list[np.ndarray] = []
        batches = self._batches(images)

        def load_next() -> np.ndarray | None:  # pulls (maybe decodes) and preprocesses a batch
            batch = next(batches, None)
            return None if batch is None else self.prepare(batch)

        with (
            ThreadPoolExecutor(max_workers=1) as helper,
            tqdm(
                total=total, disable=not progress, desc=self.name, unit="img", mininterval=1.0
            ) as bar,
        ):
            pending = helper.submit(load_next)
            while (ready := pending.result()) is not None:
                pending = helper.submit(load_next)  # next batch loads while this one runs
                chunks.append(self.run(ready))
                bar.update(len(ready))
        if not chunks:
            return np.zeros((0, self.dim), np.float32)
        out = np.concatenate(chunks)
        if out.shape[1] != self.dim:
            raise ValueError(f"{self.name}: expected {self.dim}-d vectors, got {out.shape[1]}")
        return out
