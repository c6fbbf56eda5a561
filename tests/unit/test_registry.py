"""The model registry's bookkeeping: which version serves, and pruning that never drops it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backend import registry as registry_module
from backend.detectors.versions import save_model_version, update_metadata
from backend.detectors.yolox import YoloxNano
from backend.registry import ModelRegistry, is_promoted
from backend.settings import Settings
from backend.store import Store


def _registry(tmp_path: Path, keep: int) -> ModelRegistry:
    settings = Settings(data_dir=tmp_path / "data", keep_model_versions=keep)
    settings.data_dir.mkdir(parents=True)
    store = Store(settings.resolved_database_url)
    store.upsert_project(
        1, label_config="<View/>", from_name="l", to_name="i", image_key="image", labels=["a"]
    )
    return ModelRegistry(settings, store)


def _add(registry: ModelRegistry, version: str, status: str, metadata: str = "{}") -> Path:
    directory = registry.settings.models_dir / "project-1" / version
    directory.mkdir(parents=True)
    (directory / "metadata.json").write_text(metadata)
    registry.store.add_model_version(
        1,
        version,
        str(directory),
        ["a"],
        n_annotations=1,
        n_images=1,
        annotations_revision=1,
        metrics={"status": status, "reason": "test"},
    )
    return directory


def _promote_yolox_v1(registry: ModelRegistry) -> Path:
    """A one-class YOLOX version ``v1``, promoted, that records its training tasks 4 and 7."""
    directory = registry.settings.models_dir / "project-1" / "v1"
    metadata = {"labels": ["a"], "input_hw": [64, 64], "trained_on": [4, 7]}
    save_model_version(YoloxNano(num_classes=1).eval(), directory, metadata)
    registry.store.add_model_version(
        1, "v1", str(directory), ["a"], n_annotations=2, n_images=2, annotations_revision=1,
        metrics={"status": "promoted", "reason": "test"},
    )  # fmt: skip
    return directory


def test_the_newest_promoted_version_serves_and_rejected_ones_never_do(tmp_path: Path) -> None:
    registry = _registry(tmp_path, keep=5)
    _add(registry, "v1", "promoted")
    _add(registry, "v2", "rejected")
    serving = registry.serving_record(1)
    assert serving is not None and serving.version == "v1"
    rows = {r["version"]: r for r in registry.versions_status(1)}
    assert rows["v2"]["status"] == "rejected" and rows["v2"]["reason"] == "test"


def test_pruning_keeps_the_newest_and_always_the_serving_version(tmp_path: Path) -> None:
    registry = _registry(tmp_path, keep=2)
    directories = {"v1": _add(registry, "v1", "promoted")}
    for version in ("v2", "v3", "v4"):
        directories[version] = _add(registry, version, "rejected")
    removed = registry.prune(1)
    # v1 serves (the only promoted one): kept although it is the oldest; v2 goes
    assert removed == ["v2"]
    assert directories["v1"].is_dir() and not directories["v2"].exists()
    assert directories["v3"].is_dir() and directories["v4"].is_dir()
    records = {r.version: r for r in registry.store.list_model_versions(1)}
    assert records["v2"].metrics and records["v2"].metrics["pruned"]  # the record stays
    assert not is_promoted(records["v2"]) and is_promoted(records["v1"])
    assert registry.prune(1) == []  # nothing more to do


def test_the_gate_learns_which_tasks_the_serving_version_trained_on(tmp_path: Path) -> None:
    registry = _registry(tmp_path, keep=5)
    assert registry.serving_trained_on(1) == frozenset()  # the pretrained model: none
    recorded = '{"arch": "yolox_nano", "labels": ["a"], "trained_on": [3, 5, 8]}'
    _add(registry, "v1", "promoted", recorded)
    _add(registry, "v2", "rejected", '{"arch": "yolox_nano", "labels": ["a"], "trained_on": [1]}')
    assert registry.serving_trained_on(1) == frozenset({3, 5, 8})  # v1 serves, not v2
    # a version saved before versions recorded their tasks: nothing known (logged)
    _add(registry, "v3", "promoted", '{"arch": "yolox_nano", "labels": ["a"]}')
    assert registry.serving_trained_on(1) == frozenset()


def test_a_candidate_warm_starts_only_from_a_yolox_version_that_records_its_tasks(
    tmp_path: Path,
) -> None:
    registry = _registry(tmp_path, keep=5)
    assert registry.warm_start(1, ["a"]) is None  # nothing trained serves
    directory = _promote_yolox_v1(registry)
    warm = registry.warm_start(1, ["a"])
    assert warm is not None and warm.version == "v1" and warm.trained_on == frozenset({4, 7})
    assert isinstance(warm.model, YoloxNano) and warm.model.num_classes == 1
    assert registry.warm_start(1, ["a", "b"]) is None  # the labels changed: start from COCO
    update_metadata(directory, trained_on=None)
    assert registry.warm_start(1, ["a"]) is None  # its tasks unknown: the gate could not judge


def test_a_round_takes_predictor_tasks_and_warm_start_from_one_serving_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = _registry(tmp_path, keep=5)
    nothing = registry.round_base(1, ["a"], score_floor=0.05, warm_start=True)
    # no COCO model configured and nothing trained: drawing by hand, from the COCO weights
    assert nothing.predict is None and nothing.trained_on == frozenset() and nothing.warm is None
    _promote_yolox_v1(registry)
    reads: list[str] = []
    for name in ("read_metadata", "load_model_version"):
        real = getattr(registry_module, name)
        monkeypatch.setattr(
            registry_module, name, lambda d, _real=real, _name=name: reads.append(_name) or _real(d)
        )
    base = registry.round_base(1, ["a"], score_floor=0.05, warm_start=True)
    assert reads == ["load_model_version"]  # one read gives both the model and trained_on
    assert base.warm is not None and base.warm.version == "v1"
    assert base.trained_on == base.warm.trained_on == frozenset({4, 7})
    assert base.predict is not None
    (boxes,) = base.predict([Image.new("RGB", (64, 64))])
    assert boxes.image_size == (64, 64)  # the v1 ONNX export answered, not the COCO model
    reads.clear()
    cold = registry.round_base(1, ["a"], score_floor=0.05, warm_start=False)
    assert reads == ["read_metadata"] and cold.warm is None
    assert cold.trained_on == frozenset({4, 7})  # still kept out of the slice


def _promote_two_label_v1(registry: ModelRegistry) -> YoloxNano:
    """A promoted YOLOX version ``v1`` of labels ``a, b`` that finds objects of both everywhere."""
    model = YoloxNano(num_classes=2).eval()
    with torch.no_grad():  # every anchor a sure object; ``a`` and ``b`` both above the floor
        for number, level in enumerate(model.head.per_level()):
            assert level.obj_pred.bias is not None and level.cls_pred.bias is not None
            level.obj_pred.bias.fill_(6.0)
            # ``a`` wins on the first level, ``b`` on the others: the random weights used to
            # decide, and some draws predicted one class only
            level.cls_pred.weight.zero_()
            level.cls_pred.bias.copy_(torch.tensor([2.0, 1.0] if number == 0 else [1.0, 2.0]))
    directory = registry.settings.models_dir / "project-1" / "v1"
    metadata = {"labels": ["a", "b"], "input_hw": [64, 64], "trained_on": [4, 7]}
    save_model_version(model, directory, metadata)
    registry.store.add_model_version(
        1, "v1", str(directory), ["a", "b"], n_annotations=2, n_images=2, annotations_revision=1,
        metrics={"status": "promoted", "reason": "test"},
    )  # fmt: skip
    return model


def test_after_a_label_config_edit_the_serving_version_speaks_the_new_labels(
    tmp_path: Path,
) -> None:
    """An admin removed ``a`` and added ``c`` in front of ``b``: the gate must score v1's ``b``
    boxes as ``b`` (index 1 now) and drop its ``a`` boxes. Before, they kept v1's indices: the
    gate scored ``b`` as ``c``, and a box of a removed label made every training job fail
    (``prediction label outside 0..n``)."""
    registry = _registry(tmp_path, keep=5)
    _promote_two_label_v1(registry)
    image = Image.new("RGB", (64, 64), (90, 120, 60))
    as_trained = registry.round_base(1, ["a", "b"], score_floor=0.05, warm_start=False).predict
    edited = registry.round_base(1, ["c", "b"], score_floor=0.05, warm_start=False).predict
    assert as_trained is not None and edited is not None
    (before,) = as_trained([image])
    (after,) = edited([image])
    assert set(before.labels.tolist()) == {0, 1}  # both labels predicted, as v1 learnt them
    b_boxes = before[before.labels == 1]
    assert len(b_boxes) > 0
    assert after.labels.tolist() == [1] * len(b_boxes)  # ``b`` is index 1 of the new list
    np.testing.assert_allclose(after.xyxy, b_boxes.xyxy)
    np.testing.assert_allclose(after.scores, b_boxes.scores)
    gone = registry.round_base(1, ["c"], score_floor=0.05, warm_start=False).predict
    assert gone is not None and len(gone([image])[0]) == 0  # no label left in common


def test_box_queries_get_the_serving_version_recut_to_the_new_labels(tmp_path: Path) -> None:
    registry = _registry(tmp_path, keep=5)
    v1 = _promote_two_label_v1(registry)
    served = registry.serving_torch_model(1, ["c", "b"])
    assert served is not None
    version, model, hw = served
    assert version == "v1" and hw == (64, 64) and model.num_classes == 2
    for old, new in zip(v1.head.per_level(), model.head.per_level(), strict=True):
        torch.testing.assert_close(new.cls_pred.weight[1], old.cls_pred.weight[1])  # b kept
        assert not torch.equal(new.cls_pred.weight[0], old.cls_pred.weight[0])  # c is new
        torch.testing.assert_close(new.obj_pred.weight, old.obj_pred.weight)
    same = registry.serving_torch_model(1, ["a", "b"])
    assert same is not None and same[1].num_classes == 2


def test_a_version_promoted_by_another_process_replaces_the_loaded_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server served the version it had loaded until its restart: a version that a replica
    sharing the database (or ``boxloop train``) promoted later never reached it, and neither
    did its ``/setup`` model version. It looks again at most every ``RECHECK_S``."""
    registry = _registry(tmp_path, keep=5)
    _promote_yolox_v1(registry)
    assert registry.current(1).version == "v1"
    elsewhere = ModelRegistry(registry.settings, registry.store)  # the replica
    directory = registry.settings.models_dir / "project-1" / "v2"
    metadata = {"labels": ["a"], "input_hw": [64, 64], "trained_on": [4, 7, 9]}
    save_model_version(YoloxNano(num_classes=1).eval(), directory, metadata)
    registry.store.add_model_version(
        1, "v2", str(directory), ["a"], n_annotations=3, n_images=3, annotations_revision=2,
        metrics={"status": "promoted", "reason": "test"},
    )  # fmt: skip
    assert elsewhere.swap_in(1, "v2")
    assert registry.current(1).version == "v1"  # not looked at again yet: no query per request
    monkeypatch.setattr(registry_module, "RECHECK_S", 0.0)
    assert registry.serving_version(1, ["a"]) == "v2"
    assert registry.current(1).version == "v2"
    _add(registry, "v3", "rejected")  # a rejected candidate changes nothing
    assert registry.current(1).version == "v2"


@pytest.mark.parametrize("odd_label", [" ", "Other\nvehicle"])
def test_a_version_serves_labels_that_are_blank_or_span_lines(
    tmp_path: Path, odd_label: str
) -> None:
    """Label Studio accepts such label values; ``labels.txt`` (one name a line) loses them, so
    the version's class count stopped fitting its ONNX output and every ``/predict`` failed."""
    from backend.bulk.work import DetectorSpec
    from backend.detectors.versions import load_version_detector

    labels = ["Car", odd_label]
    torch.manual_seed(0)
    model = YoloxNano(num_classes=len(labels)).eval()
    save_model_version(model, tmp_path / "v1", {"labels": labels, "input_hw": [224, 224]})
    detector = load_version_detector(tmp_path / "v1", Settings(data_dir=tmp_path / "data"))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), np.uint8))
    boxes = detector.predict([image])[0]
    assert detector.labels == labels and detector.class_names == labels  # type: ignore[attr-defined]
    assert boxes.image_size == (160, 120)
    assert (boxes.labels < len(labels)).all()
    rebuilt = DetectorSpec.from_detector(detector).load()  # bulk runs on Ray rebuild it
    assert rebuilt.detector.class_names == labels  # type: ignore[attr-defined]
    assert (rebuilt.run([image])[0].xyxy == boxes.xyxy).all()
