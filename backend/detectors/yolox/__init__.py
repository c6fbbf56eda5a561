"""Trainable YOLOX-Nano: model, COCO import from ONNX, export back to ONNX, SimOTA loss."""

from backend.detectors.yolox.loss import Assignment, YoloxTarget, simota_assign, yolox_loss
from backend.detectors.yolox.model import (
    STRIDES,
    Detections,
    YoloxNano,
    decode,
    freeze,
    grids,
    postprocess,
    remap_classes,
    set_bn_eval,
)
from backend.detectors.yolox.onnx_import import export_onnx, load_coco_yolox_nano

__all__ = [
    "STRIDES",
    "Assignment",
    "Detections",
    "YoloxNano",
    "YoloxTarget",
    "decode",
    "export_onnx",
    "freeze",
    "grids",
    "load_coco_yolox_nano",
    "postprocess",
    "remap_classes",
    "set_bn_eval",
    "simota_assign",
    "yolox_loss",
]
