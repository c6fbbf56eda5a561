"""COCO weights from the shared YOLOX-Nano ONNX file into :class:`YoloxNano`, and back out.

Why: the shared COCO model exists only as ONNX (batch norm folded into its 113 convolutions),
and a fine-tuned model must be served by the same
:class:`~backend.detectors.onnx_yolox.OnnxYoloxDetector` as the COCO one.

Import: ONNX lists nodes in the order the exporter ran them, which is the order our modules run
(:mod:`.model`), so the k-th ONNX ``Conv`` is the k-th convolution our forward calls. Every pair's
weight shape, groups, stride and padding are checked. A folded conv carries the BN's scale in its
weight and the BN's shift in its bias, so our BN becomes identity + bias: weight 1, bias = conv
bias, running mean 0, running variance ``1 − eps`` (so ``sqrt(var + eps) == 1``).

Export: the shared model's output convention (checked on its graph: the head concatenates the raw
box convolution with ``Sigmoid`` of the objectness and class convolutions, then reshapes and
transposes, with no grid decoding) is ``(B, A, 5 + C)`` rows ``[dx, dy, log w, log h,
sigmoid(obj), sigmoid(cls)…]``; :func:`export_onnx` writes the same.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import cast

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import Tensor, nn

from backend.detectors.onnx_yolox import read_class_names
from backend.detectors.yolox.model import ConvBnAct, YoloxNano

__all__ = ["export_onnx", "load_coco_yolox_nano", "load_onnx_weights"]

ONNX_INPUT_NAME = "images"
ONNX_OUTPUT_NAME = "output"


def _convs_in_execution_order(model: YoloxNano) -> list[tuple[str, nn.Conv2d]]:
    """Every Conv2d with its name, in the order a forward pass calls them.

    The pass runs on a copy on the ``meta`` device: shapes only, no kernels, no side effects.
    """
    probe = copy.deepcopy(model).to("meta")
    names = {module: name for name, module in probe.named_modules()}
    order: list[str] = []
    for module in probe.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_pre_hook(lambda m, _args: order.append(names[m]))
    with torch.no_grad():
        probe(torch.zeros(1, 3, 64, 64, device="meta"))
    convs = dict(model.named_modules())
    return [(name, cast(nn.Conv2d, convs[name])) for name in order]


def _attributes(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def load_onnx_weights(model: YoloxNano, graph: onnx.GraphProto) -> None:
    """Copy the ONNX convolutions into ``model`` in execution order (see module docstring).

    Raises ``ValueError`` naming the first convolution whose shape or settings differ.
    """
    inits = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    onnx_convs = [node for node in graph.node if node.op_type == "Conv"]
    torch_convs = _convs_in_execution_order(model)
    if len(onnx_convs) != len(torch_convs):
        raise ValueError(
            f"the ONNX graph has {len(onnx_convs)} convolutions, YoloxNano has {len(torch_convs)}"
        )
    bn_of = {m.conv: m.bn for m in model.modules() if isinstance(m, ConvBnAct)}
    for k, (node, (name, conv)) in enumerate(zip(onnx_convs, torch_convs, strict=True)):
        where = f"convolution {k} (ONNX {node.name or node.output[0]!r} → {name})"
        if node.input[1] not in inits:
            raise ValueError(f"{where}: weight {node.input[1]!r} is not an initializer")
        weight = inits[node.input[1]].astype(np.float32)
        bias = (
            inits[node.input[2]].astype(np.float32)
            if len(node.input) > 2 and node.input[2]
            else np.zeros(weight.shape[0], np.float32)
        )
        attrs = _attributes(node)
        theirs: tuple[object, ...] = (
            tuple(weight.shape),
            int(attrs.get("group", 1)),  # type: ignore[call-overload]
            tuple(attrs.get("strides", (1, 1))),  # type: ignore[arg-type]
            tuple(attrs.get("pads", (0, 0, 0, 0))),  # type: ignore[arg-type]
        )
        pad = tuple(int(v) for v in conv.padding)
        ours = (tuple(conv.weight.shape), conv.groups, tuple(conv.stride), pad + pad)
        if theirs != ours or bias.shape != (weight.shape[0],):
            raise ValueError(
                f"{where}: ONNX (weight, groups, strides, pads) {theirs} != ours {ours}"
                f" (bias {bias.shape})"
            )
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(weight))
            if conv in bn_of:
                bn = bn_of[conv]
                bn.weight.fill_(1.0)
                bn.bias.copy_(torch.from_numpy(bias))
                assert bn.running_mean is not None and bn.running_var is not None
                bn.running_mean.zero_()
                bn.running_var.fill_(1.0 - bn.eps)
            elif conv.bias is not None:
                conv.bias.copy_(torch.from_numpy(bias))
            else:
                raise ValueError(f"{where}: no bias and no batch norm to hold the ONNX bias")


def _num_classes(graph: onnx.GraphProto) -> int:
    dims = graph.output[0].type.tensor_type.shape.dim
    if len(dims) != 3 or not dims[2].dim_value or dims[2].dim_value <= 5:
        raise ValueError("ONNX output is not (B, A, 5 + C) with a fixed C")
    return int(dims[2].dim_value) - 5


def load_coco_yolox_nano(
    onnx_path: Path, class_names_path: Path | None = None
) -> tuple[YoloxNano, list[str]]:
    """The shared COCO YOLOX-Nano as a :class:`YoloxNano` in eval mode, and its class names
    (``class_names_path``, default ``coco_classes.txt`` beside the ONNX file).

    The backend passes ``Settings.resolved_onnx_class_names_path``, the file serving reads: the
    names decide which pretrained row each label's class head starts from.
    """
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {onnx_path}")
    graph = onnx.load(str(onnx_path)).graph
    names = read_class_names(
        Path(class_names_path) if class_names_path else onnx_path.parent / "coco_classes.txt"
    )
    num_classes = _num_classes(graph)
    if len(names) != num_classes:
        raise ValueError(f"{onnx_path} predicts {num_classes} classes but lists {len(names)} names")
    model = YoloxNano(num_classes)
    load_onnx_weights(model, graph)
    return model.eval(), names


class _ServingOutput(nn.Module):
    """Raw rows with sigmoid-ed objectness and class scores: the shared model's convention."""

    def __init__(self, model: YoloxNano) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        raw = self.model(x)
        return torch.cat([raw[..., :4], raw[..., 4:].sigmoid()], dim=-1)


def export_onnx(
    model: YoloxNano, path: Path, input_hw: tuple[int, int], *, dynamic_hw: bool = False
) -> Path:
    """Write ``model`` (a copy, in eval mode, on the CPU) as ONNX in the shared model's convention.

    Input ``images`` ``(B, 3, H, W)`` (batch dynamic), output ``output`` ``(B, A, 5 + C)``.
    ``H, W`` are fixed to ``input_hw`` by default because
    :class:`~backend.detectors.onnx_yolox.OnnxYoloxDetector` reads its letterbox size from the
    input shape; ``dynamic_hw=True`` makes them dynamic (the graph exports cleanly either way).
    """
    height, width = (int(v) for v in input_hw)
    if height % 32 or width % 32 or height <= 0 or width <= 0:
        raise ValueError(f"input_hw must be positive multiples of 32, got {input_hw}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = _ServingOutput(copy.deepcopy(model).cpu().float().eval())
    in_axes = {0: "batch", 2: "height", 3: "width"} if dynamic_hw else {0: "batch"}
    out_axes = {0: "batch", 1: "anchors"} if dynamic_hw else {0: "batch"}
    with warnings.catch_warnings():
        # the TorchScript exporter is deprecated; kept because it exports this graph (dynamic
        # H/W included) in one call, in the opset-17 ops onnxruntime runs
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            wrapper,
            (torch.full((1, 3, height, width), 114.0),),
            str(path),
            input_names=[ONNX_INPUT_NAME],
            output_names=[ONNX_OUTPUT_NAME],
            dynamic_axes={ONNX_INPUT_NAME: in_axes, ONNX_OUTPUT_NAME: out_axes},
            opset_version=17,
            do_constant_folding=True,
            dynamo=False,
        )
    return path
