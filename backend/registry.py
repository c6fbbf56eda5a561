"""The model registry: which model serves each project, and every version's record.

One place for what a version's life touches: loading the pretrained COCO model (ONNX for serving,
PyTorch for fine-tuning), choosing what serves a project (its newest *promoted* version, else the
COCO model mapped to its labels, else nothing), swapping a promoted version in, telling Label
Studio (the ML backend's title carries the model version), pruning old version directories, and
the per-version rows ``/status`` shows (scores, decision, threshold).

A rejected candidate is recorded with its scores and reason but never served and never reaches
Label Studio.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backend.boxes import Boxes
from backend.detectors import Detector, OnnxYoloxDetector
from backend.detectors.label_names import same_name_index
from backend.detectors.pretrained import load_pretrained
from backend.detectors.versions import load_model_version, load_version_detector, read_metadata
from backend.detectors.yolox import YoloxNano, load_coco_yolox_nano, remap_classes
from backend.settings import Settings
from backend.store import ModelVersion, Store
from backend.training.yolox_train import initial_yolox

__all__ = [
    "UNTRAINED_VERSION",
    "LoadedModel",
    "ModelRegistry",
    "RoundBase",
    "WarmStart",
    "is_promoted",
]

log = logging.getLogger(__name__)

UNTRAINED_VERSION = "boxloop-untrained"
#: Seconds between looks for a version another process promoted (see ``_loaded``).
RECHECK_S = 10.0


@dataclass
class LoadedModel:
    version: str
    detector: Detector | None


@dataclass(frozen=True)
class WarmStart:
    """A promoted version a new candidate continues from, and the tasks it trained on."""

    version: str
    model: YoloxNano
    trained_on: frozenset[int | str]


@dataclass(frozen=True)
class RoundBase:
    """What one training round is judged against and may start from, all taken from one serving
    record: a promotion landing between three separate look-ups cannot pair one version's
    predictions with another's training tasks. The registry reads that version's metadata once
    for both ``trained_on`` and the warm start.

    ``predict``: the serving model down to the gate's score floor (None: nothing serves, i.e.
    drawing by hand); ``trained_on``: the task ids it trained on; ``warm``: the warm start, when
    asked for and possible (see :meth:`ModelRegistry.warm_start`).
    """

    predict: Callable[[Sequence[Any]], list[Boxes]] | None
    trained_on: frozenset[int | str]
    warm: WarmStart | None


def is_promoted(record: ModelVersion) -> bool:
    """Versions from before the gate (no status) count as promoted."""
    metrics = record.metrics or {}
    return metrics.get("status", "promoted") == "promoted" and not metrics.get("pruned")


class ModelRegistry:
    """Serving models per project (thread-safe), backed by the store's version records."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        studio_for: Callable[[int], Any] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self._studio_for = studio_for
        self._models: dict[int, LoadedModel] = {}
        #: when each loaded model was last checked against the store (monotonic seconds)
        self._checked: dict[int, float] = {}
        self._lock = threading.Lock()
        self._pretrained: OnnxYoloxDetector | None = None
        self._pretrained_loaded = False

    # ------------------------------------------------------------------ pretrained
    def pretrained(self) -> OnnxYoloxDetector | None:
        """The COCO YOLOX-Nano ONNX model (all 80 classes), or None when there is none."""
        with self._lock:
            if not self._pretrained_loaded:
                self._pretrained_loaded = True
                try:
                    self._pretrained = load_pretrained(self.settings)
                except (OSError, ValueError) as exc:
                    log.error(
                        "could not load the ONNX detector %s: %s",
                        self.settings.resolved_onnx_model_path,
                        exc,
                    )
            return self._pretrained

    def pretrained_for(
        self, labels: Sequence[str], score_threshold: float | None = None
    ) -> OnnxYoloxDetector | None:
        """The COCO model reporting ``labels`` (None when none of them names a COCO class)."""
        base = self.pretrained()
        if base is None or not labels:
            return None
        mapped = base.with_labels(labels)
        if score_threshold is not None:
            mapped.score_threshold = float(score_threshold)
        return mapped if mapped.class_map else None

    # ------------------------------------------------------------------ serving
    def serving_record(self, project_id: int) -> ModelVersion | None:
        """The newest promoted version of a project whose directory still exists."""
        for record in reversed(self.store.list_model_versions(project_id)):
            if is_promoted(record) and Path(record.path).is_dir():
                return record
        return None

    def _loaded(self, project_id: int) -> LoadedModel | None:
        """The project's loaded model, unless a newer version was promoted since by another
        process sharing the store (a server, ``boxloop train``); looked up at most every
        ``RECHECK_S``. Why: the loaded model was served until a restart, so a replica went on
        pre-annotating with the old version after another one trained a better one."""
        now = time.monotonic()
        with self._lock:
            loaded = self._models.get(project_id)
            if loaded is None or now - self._checked.get(project_id, now) < RECHECK_S:
                return loaded
            self._checked[project_id] = now
        record = self.serving_record(project_id)
        if record is None or not self._newer(project_id, record.version, loaded.version):
            return loaded
        log.info("project %s: %s was promoted elsewhere; serving it", project_id, record.version)
        return None

    def _newer(self, project_id: int, version: str, than: str) -> bool:
        names = [r.version for r in self.store.list_model_versions(project_id)]
        return version != than and (than not in names or names.index(version) > names.index(than))

    def _keep(self, project_id: int, loaded: LoadedModel) -> None:
        with self._lock:
            self._models[project_id] = loaded
            self._checked[project_id] = time.monotonic()

    def current(self, project_id: int | None, labels: Sequence[str] | None = None) -> LoadedModel:
        """The model serving a project: its newest promoted version, else the pretrained one."""
        if project_id is not None:
            loaded = self._loaded(project_id)
            if loaded is not None:
                return loaded
            record = self.serving_record(project_id)
            if record is not None:
                loaded = LoadedModel(
                    record.version, load_version_detector(Path(record.path), self.settings)
                )
                self._keep(project_id, loaded)
                return loaded
        mapped = self.pretrained_for(labels or [])
        if mapped is not None:
            return LoadedModel(mapped.version, mapped)
        return LoadedModel(UNTRAINED_VERSION, None)

    def serving_torch_model(
        self, project_id: int, labels: Sequence[str]
    ) -> tuple[str, YoloxNano, tuple[int, int] | None] | None:
        """``(version, PyTorch model, input shape or None)`` of what serves the project, for work
        the ONNX export cannot do (box-level queries need class distributions and features):
        the newest promoted YOLOX version, else the COCO model, either with its head re-cut to
        ``labels`` (a label the version never learnt starts fresh). None when neither exists (or
        the serving version is not a YOLOX one)."""
        record = self.serving_record(project_id)
        if record is not None:
            model, metadata = load_model_version(Path(record.path))
            if not isinstance(model, YoloxNano):
                return None
            if list(record.labels) != list(labels):  # the label config changed since it trained
                rows = {t: s for s, t in same_name_index(record.labels, labels).items()}
                model = remap_classes(model, [rows.get(i) for i in range(len(labels))])
            hw = metadata.get("input_hw")
            return record.version, model, (int(hw[0]), int(hw[1])) if hw else None
        path = self.settings.resolved_onnx_model_path
        if path is None:
            return None
        coco, names = load_coco_yolox_nano(Path(path), self.settings.resolved_onnx_class_names_path)
        version = self.current(project_id, labels).version
        return version, initial_yolox(coco, names, list(labels)), None

    def serving_predictor(
        self, project_id: int, labels: Sequence[str], score_floor: float
    ) -> Callable[[Sequence[Any]], list[Boxes]] | None:
        """What the gate compares a candidate with: the serving model down to ``score_floor``."""
        return self._predictor(self.serving_record(project_id), labels, score_floor)

    def serving_trained_on(self, project_id: int) -> frozenset[int | str]:
        """Task ids the serving version trained on (its metadata's ``trained_on``), which the
        gate keeps out of the slice it scores the serving version on. Empty for the pretrained
        model, and for a version saved before versions recorded them (logged)."""
        record = self.serving_record(project_id)
        if record is None:
            return frozenset()
        return self._trained_on(record, read_metadata(Path(record.path)))

    def warm_start(self, project_id: int, labels: Sequence[str]) -> WarmStart | None:
        """The serving version as a candidate's starting point; None when nothing trained
        serves, or it is no YOLOX version of ``labels``, or it does not record the tasks it
        trained on (the gate could not keep them out of its slice)."""
        record = self.serving_record(project_id)
        return None if record is None else self._warm(record, labels)[0]

    def round_base(
        self, project_id: int, labels: Sequence[str], *, score_floor: float, warm_start: bool
    ) -> RoundBase:
        """:meth:`serving_predictor`, :meth:`serving_trained_on` and (with ``warm_start``)
        :meth:`warm_start`, all of the one version serving now (:class:`RoundBase`)."""
        record = self.serving_record(project_id)
        predict = self._predictor(record, labels, score_floor)
        if record is None:
            return RoundBase(predict, frozenset(), None)
        if warm_start:
            warm, metadata = self._warm(record, labels)
        else:
            warm, metadata = None, read_metadata(Path(record.path))
        return RoundBase(predict, self._trained_on(record, metadata), warm)

    def _predictor(
        self, record: ModelVersion | None, labels: Sequence[str], score_floor: float
    ) -> Callable[[Sequence[Any]], list[Boxes]] | None:
        if record is not None:
            detector: Detector = load_version_detector(
                Path(record.path), self.settings, score_floor=score_floor
            )
            if list(record.labels) == list(labels):
                return lambda images: detector.predict(images)
            # the label config changed since it trained: its boxes in the project's label indices
            # (a removed label's boxes drop), or the gate would score them as other labels
            index = same_name_index(record.labels, labels)
            return lambda images: [b.relabeled(index) for b in detector.predict(images)]
        mapped = self.pretrained_for(labels, score_threshold=score_floor)
        if mapped is None:
            return None
        return lambda images: mapped.predict(images)

    @staticmethod
    def _trained_on(record: ModelVersion, metadata: dict[str, Any]) -> frozenset[int | str]:
        trained_on = metadata.get("trained_on")
        if trained_on is None:
            log.warning(
                "%s does not record its training tasks: the gate may score it on some of them",
                record.version,
            )
            return frozenset()
        return frozenset(trained_on)

    @staticmethod
    def _warm(
        record: ModelVersion, labels: Sequence[str]
    ) -> tuple[WarmStart | None, dict[str, Any]]:
        """``(warm start or None, the record's metadata)``; the model is loaded only when the
        labels match."""
        if list(record.labels) != list(labels):
            return None, read_metadata(Path(record.path))
        model, metadata = load_model_version(Path(record.path))
        trained_on = metadata.get("trained_on")
        if not isinstance(model, YoloxNano) or trained_on is None:
            return None, metadata
        return WarmStart(record.version, model, frozenset(trained_on)), metadata

    def swap_in(self, project_id: int, version: str) -> bool:
        """Serve ``version`` if it was promoted; False (nothing changes) for a rejected one."""
        record = next(
            (v for v in self.store.list_model_versions(project_id) if v.version == version), None
        )
        if record is None or not is_promoted(record):
            return False
        detector = load_version_detector(Path(record.path), self.settings)
        self._keep(project_id, LoadedModel(version, detector))
        log.info("project %s now served by %s", project_id, version)
        self.prune(project_id)
        return True

    def serving_version(self, project_id: int, labels: Sequence[str]) -> str:
        loaded = self._loaded(project_id)
        if loaded is not None:
            return loaded.version
        record = self.serving_record(project_id)
        return record.version if record else self.current(None, labels).version

    # ------------------------------------------------------------------ Label Studio
    def update_title(self, project_id: int, version: str) -> None:
        """Label Studio shows (and scores the queue by) the backend's model version."""
        client = self._studio_for(project_id) if self._studio_for else None
        if client is None:
            return
        try:
            client.set_backend_title(project_id, None, version)
        except Exception as exc:  # Label Studio down: the next /setup returns the version anyway
            log.warning("could not update the ML backend title in Label Studio: %s", exc)

    # ------------------------------------------------------------------ housekeeping
    def prune(self, project_id: int) -> list[str]:
        """Delete the directories of all but the newest ``keep_model_versions`` versions.

        The serving version is always kept. The records stay (marked ``pruned``) so ``/status``
        still shows what each version scored.
        """
        keep = max(1, self.settings.keep_model_versions)
        records = self.store.list_model_versions(project_id)
        serving = self.serving_record(project_id)
        live = [r for r in records if not (r.metrics or {}).get("pruned")]
        removed: list[str] = []
        for record in live[: max(0, len(live) - keep)]:
            if serving is not None and record.version == serving.version:
                continue
            shutil.rmtree(record.path, ignore_errors=True)
            self.store.update_model_version_metrics(
                project_id, record.version, {**(record.metrics or {}), "pruned": True}
            )
            removed.append(record.version)
        if removed:
            log.info("project %s: pruned %s", project_id, ", ".join(removed))
        return removed

    def versions_status(self, project_id: int) -> list[dict[str, Any]]:
        """One row per version: when, on what, the gate's decision, its scores and threshold."""
        rows = []
        for v in self.store.list_model_versions(project_id):
            metrics = v.metrics or {}
            rows.append(
                {
                    "version": v.version,
                    "created_at": v.created_at.isoformat() + "Z",
                    "n_images": v.n_images,
                    "n_annotations": v.n_annotations,
                    "status": metrics.get("status", "promoted"),
                    "reason": metrics.get("reason"),
                    "score_threshold": metrics.get("score_threshold"),
                    "serves_boxes": metrics.get("serves_boxes", True),
                    "validation": metrics.get("validation"),
                    "pruned": bool(metrics.get("pruned", False)),
                }
            )
        return rows
