"""How long one fine-tuning round takes, and how fast its version serves, on this machine.

One process, the same 50 real images (VOC subset by default), measured back to back:

* a YOLOX-Nano round as the product runs it (:func:`backend.training.yolox_train.train_yolox`
  with the settings' schedule), beside a Faster R-CNN round (the ImageNet loop it replaced,
  :func:`backend.training.train_detector`, its default schedule);
* a cross-validation round of the promotion gate (:func:`backend.training.gate.run_round`) on
  the first ``--cv-images`` images at the product's settings, its fold models under the
  default rule (``"visits"``: the candidate's image visits) and under ``"candidate"`` (half
  the steps), nothing serving;
* one training step (forward, loss, backward) on the same batch with the weights in NCHW and in
  channels-last, the memory format :func:`train_yolox` uses (median of ``--repeats`` each);
* the fine-tuned YOLOX version served from its ONNX export by onnxruntime (the product's path)
  beside the same weights in eager PyTorch, one image at a time (p50 over ``--repeats``).

Writes JSON and a Markdown table, with the load average before and after (a figure taken beside
other jobs is pessimistic). Usage::

    python -m benchmark.round_speed [--images 50] [--out benchmark/results/round_speed.json]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import tempfile
import time
import typing
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from backend.detectors.versions import load_version_detector, save_model_version
from backend.detectors.yolox import (
    YoloxNano,
    YoloxTarget,
    decode,
    load_coco_yolox_nano,
    postprocess,
    set_bn_eval,
    yolox_loss,
)
from backend.settings import FoldEpochRule, Settings, load_settings
from backend.training import TrainConfig, TrainSample, train_detector
from backend.training.gate import GateConfig, LabeledImage, run_round
from backend.training.yolox_train import (
    YoloxTrainConfig,
    epochs_for,
    initial_yolox,
    input_shape_for,
    letterbox_tensor,
    train_yolox,
)
from benchmark.datasets import expand_path, load_dataset


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _p50(values: list[float]) -> float:
    return float(np.percentile(values, 50))


def _step_seconds(
    init: torch.nn.Module,
    batch: torch.Tensor,
    targets: list[YoloxTarget],
    hw: tuple[int, int],
    channels_last: bool,
    repeats: int,
) -> float:
    """Median seconds of one training step (forward, YOLOX loss, backward) of a copy of
    ``init`` in train mode with frozen BN, as :func:`train_yolox` steps."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = copy.deepcopy(init).to(memory_format=memory_format)
    model.train()
    set_bn_eval(model)
    inputs = batch.contiguous(memory_format=memory_format)
    seconds = []
    for _ in range(repeats + 1):  # the first step warms oneDNN's kernel cache up
        started = time.perf_counter()
        yolox_loss(model(inputs), targets, hw)["total"].backward()
        seconds.append(time.perf_counter() - started)
        model.zero_grad(set_to_none=True)
    return _p50(seconds[1:])


def _cv_round_seconds(
    labeled: list[LabeledImage],
    labels: list[str],
    init: YoloxNano,
    settings: Settings,
    config: YoloxTrainConfig,
    rule: FoldEpochRule,
) -> float:
    """Seconds of one cross-validation round (fold models, candidate, export, scoring)."""
    gate = dataclasses.replace(GateConfig.from_settings(settings), cv_fold_epochs=rule)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        outcome = run_round(
            labeled,
            labels,
            init=init,
            serving_predict=None,
            directory=Path(tmp) / "candidate",
            metadata={"version": "candidate", "labels": labels},
            settings=settings,
            train_config=config,
            gate=gate,
        )
        seconds = time.perf_counter() - started
    if not outcome.mode.endswith("cross-validation"):
        raise ValueError(f"{len(labeled)} images made a {outcome.mode} round, not cross-validation")
    return seconds


def run(
    dataset_spec: str,
    n_images: int,
    repeats: int,
    onnx_model: Path,
    out: Path,
    cv_images: int = 20,
) -> dict[str, Any]:
    load_before = _load()
    torch.set_num_threads(2)
    dataset = load_dataset(dataset_spec)
    chosen = dataset.samples[:n_images]
    images = [s.load_image() for s in chosen]
    samples = [TrainSample(image, s.boxes.kept()) for image, s in zip(images, chosen, strict=True)]
    labels = list(dataset.labels)
    settings = load_settings(onnx_model_path=onnx_model)

    coco, names = load_coco_yolox_nano(onnx_model)
    init = initial_yolox(coco, names, labels)
    config = YoloxTrainConfig.from_settings(settings)
    hw = input_shape_for([im.size for im in images], config)

    batch_images = images[: config.batch_size]
    boxed = [letterbox_tensor(image, hw) for image in batch_images]
    batch = torch.stack([tensor for tensor, _ in boxed])
    targets = [
        YoloxTarget(
            torch.from_numpy(s.boxes.kept().xyxy.astype(np.float32) * r).reshape(-1, 4),
            torch.from_numpy(s.boxes.kept().labels.astype(np.int64)),
        )
        for s, (_, r) in zip(chosen[: config.batch_size], boxed, strict=True)
    ]
    step_nchw = _step_seconds(init, batch, targets, hw, False, repeats)
    step_cl = _step_seconds(init, batch, targets, hw, True, repeats)

    labeled = [
        LabeledImage(key=s.image_id, image=image, boxes=s.boxes)
        for s, image in zip(chosen[:cv_images], images, strict=False)
    ]
    cv_seconds = {
        rule: _cv_round_seconds(labeled, labels, init, settings, config, rule)
        for rule in typing.get_args(FoldEpochRule)
        if rule != "by_size"
    }
    start = time.perf_counter()
    model = train_yolox(samples, init, config, input_hw=hw)
    yolox_seconds = time.perf_counter() - start

    frcnn_config = TrainConfig.from_settings(settings, arch="fasterrcnn_effnet_lite0")
    start = time.perf_counter()
    train_detector(samples, labels, frcnn_config)
    frcnn_seconds = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        directory = save_model_version(
            model, Path(tmp) / "v1", {"labels": labels, "input_hw": list(hw)}
        )
        served = load_version_detector(directory, settings)
        probe = images[0]
        served.predict([probe])  # warm-up
        onnx_ms = []
        for _ in tqdm(range(repeats), desc="onnxruntime"):
            started = time.perf_counter()
            served.predict([probe])
            onnx_ms.append(1000 * (time.perf_counter() - started))
    eager_ms = []
    model.eval()
    with torch.no_grad():
        for _ in tqdm(range(repeats), desc="eager PyTorch"):
            started = time.perf_counter()
            tensor, _ = letterbox_tensor(probe, hw)
            postprocess(decode(model(tensor[None]), hw), settings.score_threshold)
            eager_ms.append(1000 * (time.perf_counter() - started))

    onnx_p50, eager_p50 = round(_p50(onnx_ms), 1), round(_p50(eager_ms), 1)
    load_after = _load()
    epochs = epochs_for(n_images, config)
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": 2},
        "load_average_1_5_15": {"before": load_before, "after": load_after},
        "dataset": dataset_spec,
        "images": n_images,
        "yolox_round": {
            "seconds": round(yolox_seconds, 1),
            "input_hw": list(hw),
            "epochs": epochs,
            "config": config.to_dict(),
        },
        "cross_validation_round": {
            "images": len(labeled),
            "seconds_by_fold_rule": {k: round(v, 1) for k, v in cv_seconds.items()},
            "visits_over_candidate": round(cv_seconds["visits"] / cv_seconds["candidate"], 2),
        },
        "training_step": {
            "batch": len(batch_images),
            "nchw_seconds_p50": round(step_nchw, 3),
            "channels_last_seconds_p50": round(step_cl, 3),
            "speedup": round(step_nchw / step_cl, 2),
        },
        "fasterrcnn_round": {"seconds": round(frcnn_seconds, 1), "epochs": frcnn_config.epochs},
        "round_speedup_vs_fasterrcnn": round(frcnn_seconds / yolox_seconds, 2),
        "serve_ms_one_image": {
            "onnxruntime_p50": onnx_p50,
            "eager_pytorch_p50": eager_p50,
            "speedup": round(_p50(eager_ms) / _p50(onnx_ms), 2),
            "image_size": list(probe.size),
            "repeats": repeats,
        },
        "goals": {"round_seconds_50_images": 60},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    rows = [
        "| what | result |",
        "|---|---|",
        f"| YOLOX-Nano round, {n_images} images, {hw[0]}×{hw[1]}, "
        f"{epochs} epochs | {yolox_seconds:.1f} s |",
        f"| cross-validation round, {len(labeled)} images, fold models with the candidate's "
        f"visits / its epochs | {cv_seconds['visits']:.1f} s / {cv_seconds['candidate']:.1f} s |",
        f"| one training step, batch {len(batch_images)}: NCHW / channels-last (p50) | "
        f"{step_nchw:.3f} s / {step_cl:.3f} s ({step_nchw / step_cl:.2f}×) |",
        f"| Faster R-CNN round (ImageNet, {frcnn_config.epochs} epochs) | {frcnn_seconds:.1f} s |",
        f"| fine-tuned version, one image, onnxruntime p50 | {onnx_p50} ms |",
        f"| same weights, eager PyTorch p50 | {eager_p50} ms |",
        f"| load average before / after | {load_before} / {load_after} |",
    ]
    out.with_suffix(".md").write_text("\n".join(rows) + "\n")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dataset", default="voc:$BOXLOOP_SHARED_DATA/voc/VOCdevkit/VOC2012", help="dataset spec"
    )
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--cv-images", type=int, default=20, help="images of the cross-validation round timed"
    )
    parser.add_argument(
        "--onnx-model",
        default="$BOXLOOP_SHARED_DATA/models/yolox_nano_coco/yolox_nano.onnx",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmark/results/round_speed.json"))
    args = parser.parse_args(argv)
    if "BOXLOOP_SHARED_DATA" not in os.environ:
        os.environ["BOXLOOP_SHARED_DATA"] = str(Path("../shared/data").resolve())
    results = run(
        args.dataset,
        args.images,
        args.repeats,
        expand_path(args.onnx_model),
        args.out,
        args.cv_images,
    )
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
