"""Queue control for a project: features → order → store → Label Studio.

The engine side of ordering. It pulls the project's tasks (from Label Studio
when connected, else those the store has seen), computes missing feature vectors
once per task and extractor, orders the pool with :mod:`backend.ordering`,
stores the order, and pushes it to Label Studio (a rank field in each task's
data, a Data Manager view sorted by it, and optionally prediction scores for
Uncertainty sampling). New tasks are placed into the stored order without
recomputing the rest.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from backend.bulk.engine import InProcessEngine, make_engine
from backend.bulk.features import extract_features
from backend.bulk.work import EncoderSpec, LoadedSpec, ModelSpec, WorkItem
from backend.errors import ServiceError
from backend.features import SimNetConfig, make_extractor, train_simnet
from backend.features.compute import FeatureReport
from backend.features.registry import EXTRACTOR_NAMES, simnet_dir
from backend.images import ImageSource, task_image_loader
from backend.ordering import FEATURE_STRATEGIES, OrderPlan, Strategy, build_order, place_new_tasks
from backend.ordering.plan import load_plan, set_view_id
from backend.ordering.ranks import ranks_for, rerank
from backend.settings import Settings, SettingsError
from backend.store import Store
from backend.task_utility import record_fields
from backend.utility.scorer import UtilityScorer, stored_scores

log = logging.getLogger(__name__)

#: The model version of an order's rank scores on a project without one (no backend connected):
#: Uncertainty sampling orders the queue by the scores of the project's model version.
ORDER_VERSION = "boxloop-order"


#: Feature extractors an order may use (aliases included).
EXTRACTORS: tuple[str, ...] = (*EXTRACTOR_NAMES, "imgnet")


class OrderRequest(BaseModel):
    """What an admin asks for: one typed request for ``boxloop order`` and
    ``POST /projects/{id}/order``.

    The class defaults are the settings' defaults; :meth:`for_settings` gives the request class
    of one server, whose defaults are its ``BOXLOOP_ORDER_*`` / ``BOXLOOP_FEATURE_EXTRACTOR``
    settings, so the CLI and HTTP fill what an admin leaves out the same way. Bad values
    (an unknown strategy, ``start`` other than labeled/random) are refused, never reinterpreted.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    strategy: Strategy = Field(
        default="random",
        description="random | similar | dissimilar | temporal (BOXLOOP_ORDER_STRATEGY)",
    )
    extractor: str = Field(
        default="imgnet_effnet_lite0",
        description="feature extractor of similar/dissimilar (BOXLOOP_FEATURE_EXTRACTOR)",
        json_schema_extra={"enum": list(EXTRACTORS)},
    )
    batch_size: int = Field(
        default=10, ge=1, le=100_000, description="tasks per batch (BOXLOOP_ORDER_BATCH_SIZE)"
    )
    seed: int = Field(default=0, ge=0, le=2**32 - 1, description="random seed (BOXLOOP_ORDER_SEED)")
    n_seed: int = Field(default=1, ge=1, le=10_000, description="random start images")
    start: Literal["labeled", "random"] = Field(
        default="labeled",
        description="labeled: start from the labeled tasks; random: from random ones",
    )
    pca_dim: int | None = Field(default=None, ge=1, le=4096, description="reduce features first")
    temporal_field: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="task data field of the temporal order",
    )
    simnet_epochs: int = Field(default=25, ge=1, le=1000, description="SimNet training epochs")
    push: bool = Field(default=True, description="push ranks and the sorted view to Label Studio")
    uncertainty_scores: bool = Field(
        default=False, description="also set prediction scores from ranks (Uncertainty sampling)"
    )

    @field_validator("extractor")
    @classmethod
    def _known_extractor(cls, value: str) -> str:
        if value not in EXTRACTORS:
            raise ValueError(f"unknown feature extractor {value!r}; known: {', '.join(EXTRACTORS)}")
        return value

    @classmethod
    def for_settings(cls, settings: Settings) -> type[OrderRequest]:
        """The request class whose defaults are ``settings`` (validated: a bad setting fails
        here, at start-up, not on the first order)."""
        setting_of = {  # request field: the setting that gives its default
            "strategy": "order_strategy",
            "extractor": "feature_extractor",
            "batch_size": "order_batch_size",
            "seed": "order_seed",
        }
        defaults = {name: getattr(settings, setting) for name, setting in setting_of.items()}
        try:
            checked = cls.model_validate(defaults)
        except ValidationError as exc:
            raise SettingsError.from_validation(exc, setting_of) from exc
        fields: dict[str, Any] = {}
        for name in defaults:
            info = copy.copy(cls.model_fields[name])
            info.default = getattr(checked, name)
            fields[name] = (info.annotation, info)
        model: type[OrderRequest] = create_model(
            cls.__name__, __base__=cls, __module__=cls.__module__, **fields
        )
        return model


@dataclass(frozen=True)
class QueueRefresh:
    """What :meth:`QueueManager.refresh_for_version` did after a retrain."""

    model_version: str
    preannotated: int  # tasks of the next batch given the new model's boxes
    boxes: int
    scores_updated: int
    scores_created: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class QueueManager:
    """Orders a project's queue and keeps Label Studio in step with it."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        studio_for: Callable[[int], Any],
        image_source_for: Callable[[int], ImageSource],
        utility: UtilityScorer | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.studio_for = studio_for
        self.image_source_for = image_source_for
        self.utility = utility

    # ------------------------------------------------------------------ helpers
    def rank_scores(self, project_id: int) -> dict[int, float]:
        """Under Uncertainty-sampling ordering the task score *is* the queue position: a new
        prediction must carry the task's rank score, or it would reorder the queue. ``{}``
        under any other ordering."""
        order = self.store.get_order(project_id)
        if order is None or not order.params.get("uncertainty_scores"):
            return {}
        from backend.labelstudio.queue import rank_score

        ranks = zip(order.task_ids, order.params.get("ranks") or [], strict=False)
        return {int(task_id): rank_score(int(rank)) for task_id, rank in ranks}

    def sync_tasks(self, project_id: int) -> None:
        studio = self.studio_for(project_id)
        if studio is None:
            return
        known = {task_id for task_id, _ in self.store.list_tasks(project_id)}
        tasks = studio.list_tasks(project_id)
        self.store.upsert_tasks(
            project_id, [(int(t["id"]), dict(t.get("data") or {})) for t in tasks]
        )
        self.store.remove_tasks(project_id, known - {int(t["id"]) for t in tasks})  # deleted

    def _labeled(self, project_id: int) -> list[int]:
        return sorted(
            {a.task_id for a in self.store.list_annotations(project_id) if not a.was_cancelled}
        )

    def _loader(
        self, project_id: int, image_key: str
    ) -> Callable[[Mapping[str, Any]], Image.Image]:
        return task_image_loader(self.image_source_for(project_id), image_key)

    def _extractor_name(self, project_id: int, request: OrderRequest, image_key: str) -> str:
        """Compute every missing vector for the project's tasks; returns the extractor's name."""
        tasks = self.store.list_tasks(project_id)
        loader = self._loader(project_id, image_key)
        directory = None
        if request.extractor == "simnet":
            directory = simnet_dir(self.settings, project_id)
            if not (directory / "simnet.json").is_file():
                images = []
                for task_id, data in tasks:
                    try:
                        images.append(loader(data))
                    except Exception as exc:  # reported per task when the features are computed
                        log.warning("task %s: not used to train SimNet: %s", task_id, exc)
                if not images:
                    raise ValueError("no task image could be loaded to train SimNet")
                train_simnet(
                    images,
                    directory,
                    SimNetConfig(
                        epochs=request.simnet_epochs,
                        seed=request.seed,
                        num_threads=self.settings.num_threads,
                    ),
                )
        extractor = make_extractor(request.extractor, self.settings, simnet_directory=directory)
        report = self._compute_features(project_id, extractor, tasks, image_key)
        if report.failed:
            log.warning(
                "project %s: no features for %d tasks: %s",
                project_id,
                len(report.failed),
                dict(list(report.failed.items())[:3]),
            )
        return extractor.name

    def _compute_features(
        self,
        project_id: int,
        extractor: Any,
        tasks: list[tuple[int, dict[str, Any]]],
        image_key: str,
    ) -> FeatureReport:
        """Missing vectors through the bulk engine (in process, or on the Ray cluster at
        ``BOXLOOP_RAY_ADDRESS``): the path bulk pre-annotation takes, images fetched
        concurrently and vectors stored as they come back."""
        items, failed = [], {}
        for task_id, data in tasks:
            reference = data.get(image_key)
            if isinstance(reference, str) and reference:
                items.append(WorkItem(task_id, reference))
            else:
                failed[task_id] = f"task data has no image under ${image_key}"
        engine = make_engine(
            ray_address=self.settings.ray_address,
            batch_size=self.settings.feature_batch_size,
            fetch_concurrency=self.settings.bulk_fetch_concurrency,
        )
        if isinstance(engine, InProcessEngine):
            spec: ModelSpec = LoadedSpec(extractor.name, extractor)
        else:
            spec = EncoderSpec.from_encoder(extractor)
        report = extract_features(
            self.store,
            project_id,
            spec,
            items,
            engine,
            self.image_source_for(project_id),
            total=len(items),
        )
        report.failed.update(failed)
        return report

    # ------------------------------------------------------------------ public
    def order(self, project_id: int, request: OrderRequest) -> OrderPlan:
        project = self.store.get_project(project_id)
        if project is None:
            raise KeyError(f"project {project_id} is unknown to boxloop (connect it first)")
        self.sync_tasks(project_id)
        if not self.store.list_tasks(project_id):  # the plan's ValueError made a 500
            raise ServiceError(
                409,
                f"project {project_id} has no tasks to order: import them into Label Studio "
                "(boxloop records them from its TASKS_CREATED webhook, or lists them when "
                "it reaches Label Studio)",
            )
        extractor = None
        if request.strategy in FEATURE_STRATEGIES:
            extractor = self._extractor_name(project_id, request, project.image_key)
        plan = build_order(
            self.store,
            project_id,
            request.strategy,
            extractor=extractor,
            labeled_task_ids=self._labeled(project_id),
            start=request.start,
            seed=request.seed,
            n_seed=request.n_seed,
            pca_dim=request.pca_dim,
            temporal_field=request.temporal_field,
            image_key=project.image_key,
            batch_size=request.batch_size,
            progress=True,
        )
        plan.params["uncertainty_scores"] = bool(request.uncertainty_scores)
        plan.params["extractor_key"] = request.extractor if extractor else None
        if self._moves_low_utility():
            plan = self._low_utility_last(project_id, plan, project.image_key)
        self.store.set_order(project_id, plan.strategy, plan.params, plan.task_ids, plan.view_id)
        if request.push:
            plan = self.push(project_id, plan)
        return plan

    def _moves_low_utility(self) -> bool:
        return self.utility is not None and self.utility.policy.action == "move_to_end"

    def _low_utility_last(
        self,
        project_id: int,
        plan: OrderPlan,
        image_key: str,
        old_ranks: Mapping[int, int] | None = None,
    ) -> OrderPlan:
        """The plan with low-utility tasks after all others (``BOXLOOP_UTILITY_ACTION=
        move_to_end``). Tasks not scored yet are scored now and their score stored in the task
        data; a task whose image cannot be loaded keeps its place. With ``old_ranks`` the tasks
        keep those ranks where they still fit (fewer writes to Label Studio)."""
        assert self.utility is not None
        tasks = dict(self.store.list_tasks(project_id))
        scores = stored_scores(tasks.items(), self.utility.field)
        loader = self._loader(project_id, image_key)
        todo = [t for t in plan.task_ids if t not in scores and t in tasks]
        for begin in range(0, len(todo), self.settings.feature_batch_size):
            chunk, images = [], []
            for task_id in todo[begin : begin + self.settings.feature_batch_size]:
                try:
                    images.append(loader(tasks[task_id]))
                    chunk.append(task_id)
                except Exception as exc:  # one bad image must not stop the order
                    log.warning("project %s task %s: no utility (%s)", project_id, task_id, exc)
            stored = map(self.utility.policy.stored, self.utility.score(images))
            new = dict(zip(chunk, stored, strict=True))
            scores.update(new)
            self._record_scores(project_id, {t: self.utility.fields(s) for t, s in new.items()})
        order = self.utility.policy.order(plan.task_ids, scores)
        moved = sum(1 for t in order if self.utility.policy.is_low(scores.get(t)))
        position = {t: i for i, t in enumerate(plan.task_ids)}
        ranks = ranks_for(order) if old_ranks is None else rerank(order, old_ranks)[0]
        params = dict(plan.params)
        params["ranks"] = [ranks[t] for t in order]
        params["utility_moved_to_end"] = moved
        distance = [plan.distance[position[t]] for t in order]
        if "distance" in params:
            params["distance"] = distance
        return OrderPlan(
            project_id,
            plan.strategy,
            order,
            ranks,
            distance,
            params,
            plan.view_id,
            plan.missing_features,
        )

    def _record_scores(self, project_id: int, fields: dict[int, dict[str, Any]]) -> None:
        """Store new utility scores, merged into the tasks' current data, in boxloop's store
        and in Label Studio, whatever the order's ``push``: each re-sync (every order, the
        start-up reconcile) replaces the store's task data with Label Studio's, so scores held
        by the store alone were lost after one sync and the next order scored the pool again.
        A failed write is logged; the order goes on with the scores it has."""
        try:
            record_fields(self.store, self.studio_for(project_id), project_id, fields)
        except Exception:
            log.exception("project %s: storing utility scores failed", project_id)

    def push(
        self, project_id: int, plan: OrderPlan, task_ids: Iterable[int] | None = None
    ) -> OrderPlan:
        """Write ranks (all, or ``task_ids``) and the sorted view into Label Studio."""
        studio = self.studio_for(project_id)
        if studio is None:
            log.info("project %s: no Label Studio connection; order stored only", project_id)
            return plan
        from backend.labelstudio import queue

        only = None if task_ids is None else list(task_ids)
        own_version = None  # the scores' version when the project has none
        if plan.params.get("uncertainty_scores") and task_ids is None:
            # keep the project's model_version (the backend title = the served version)
            model_version = studio.get_project(project_id).get("model_version")
            if model_version:
                queue.enable_uncertainty_sampling(studio, project_id, model_version)
            else:  # Label Studio accepts a version only once predictions carry it: after them
                own_version = ORDER_VERSION
        view_id = queue.push_order(
            studio,
            project_id,
            plan.task_ids,
            plan.ranks,
            None,  # Label Studio's task data now: deleted tasks left out, edits kept
            only_task_ids=only,
            view_id=plan.view_id,
            uncertainty=True if plan.params.get("uncertainty_scores") else None,
            model_version=own_version,
        )
        if own_version is not None:
            queue.enable_uncertainty_sampling(studio, project_id, own_version)
        if view_id != plan.view_id:
            plan = set_view_id(self.store, plan, view_id)
        return plan

    def refresh_for_version(
        self,
        project_id: int,
        model_version: str,
        predict: Callable[[list[tuple[int, dict[str, Any]]]], Mapping[int, list[dict[str, Any]]]],
    ) -> QueueRefresh | None:
        """Carry an Uncertainty-sampling order over to a newly served model version.

        Label Studio orders the queue by the scores of the *project's model version* only, and a
        retrain changes that version, so the old rank scores stop counting. This pre-annotates
        the next batch of unlabelled tasks in queue order with the new model (``predict``: task
        id and data → result), stores those boxes with their rank scores, and gives every other
        ranked task a score-only prediction of the new version: the queue keeps boxloop's order
        and the next batch arrives pre-annotated by the newest model (train → predict → correct).
        Does nothing (None) for orders without Uncertainty scores or without Label Studio.
        """
        plan = load_plan(self.store, project_id)
        if plan is None or not plan.params.get("uncertainty_scores"):
            return None
        studio = self.studio_for(project_id)
        if studio is None:
            return None
        from backend.labelstudio import queue

        labeled = set(self._labeled(project_id))
        # Tasks as Label Studio has them now: one deleted since the order was made must not be
        # scored (its prediction import would fail and take the whole carry-over with it).
        data = {int(t["id"]): dict(t.get("data") or {}) for t in studio.list_tasks(project_id)}
        ranks = {t: r for t, r in plan.ranks.items() if t in data}
        upcoming = [t for t in plan.task_ids if t not in labeled and t in data]
        size = int(plan.params.get("batch_size") or self.settings.order_batch_size)
        batch = upcoming[:size]
        results = predict([(t, data[t]) for t in batch]) if batch else {}
        listed = queue.list_predictions(studio, project_id)  # once, for both writes below
        updated, created = queue.push_version_predictions(
            studio, project_id, results, ranks, model_version, predictions=listed
        )
        rest = {t: r for t, r in ranks.items() if t not in results}  # the batch is scored above
        scored, score_created = queue.set_rank_scores(
            studio, project_id, rest, model_version=model_version, predictions=listed
        )
        # after the imports: Label Studio accepts a model_version only once predictions carry it
        carried = updated + created + scored + score_created > 0
        if carried and studio.get_project(project_id).get("model_version") != model_version:
            queue.enable_uncertainty_sampling(studio, project_id, model_version)
        refresh = QueueRefresh(
            model_version=model_version,
            preannotated=len(results),
            boxes=sum(len(r) for r in results.values()),
            scores_updated=updated + scored,
            scores_created=created + score_created,
        )
        log.info("project %s: queue carried over to %s: %s", project_id, model_version, refresh)
        return refresh

    def place_new(self, project_id: int, task_ids: Iterable[int]) -> list[int]:
        """Give new tasks features and a place in the stored order (low-utility ones last under
        ``move_to_end``); push changed ranks."""
        plan = load_plan(self.store, project_id)
        if plan is None:
            return []
        project = self.store.get_project(project_id)
        assert project is not None
        extractor_key = plan.params.get("extractor_key")
        if plan.strategy in FEATURE_STRATEGIES and extractor_key:
            self._extractor_name(
                project_id, OrderRequest(extractor=str(extractor_key)), project.image_key
            )
        new_plan, changed = place_new_tasks(
            self.store, project_id, task_ids, labeled_task_ids=self._labeled(project_id)
        )
        if changed and self._moves_low_utility():
            # new low-utility tasks join the others at the end, as in a fresh order
            new_plan = self._low_utility_last(
                project_id, new_plan, project.image_key, old_ranks=plan.ranks
            )
            self.store.set_order(
                project_id, new_plan.strategy, new_plan.params, new_plan.task_ids, new_plan.view_id
            )
            changed = [t for t in new_plan.task_ids if plan.ranks.get(t) != new_plan.ranks[t]]
        if changed:
            self.push(project_id, new_plan, changed)
        return changed
