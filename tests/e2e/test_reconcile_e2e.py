"""Start-up reconcile against a real Label Studio: what no webhook delivered is pulled in.

A server that was down, or a project connected after its team started labelling, has missed
webhooks. At start the server pulls every task and annotation of each stored project it can
reach (``backend.reconcile.reconcile_all``), tombstones the ones deleted in Label Studio, hands
the tasks it did not hold to what TASKS_CREATED feeds (queue placement, search vectors), and lets
training see the annotations.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from backend.reconcile import reconcile_all
from backend.service import BoxloopService
from backend.settings import Settings
from tests.e2e.conftest import (
    ImageProject,
    LabelStudioServer,
    delete_annotation,
    ground_truth_result,
    submit_annotation,
)

pytestmark = pytest.mark.e2e


def test_start_up_reconcile_pulls_what_no_webhook_delivered(
    label_studio: LabelStudioServer, image_project: ImageProject, tmp_path: Path
) -> None:
    ids = image_project.task_ids
    first, second = (
        submit_annotation(label_studio, t, ground_truth_result(image_project, t)) for t in ids[:2]
    )
    settings = Settings(
        data_dir=tmp_path / "data",
        label_studio_url=label_studio.url,
        label_studio_token=label_studio.token,
        allowed_local_roots=[label_studio.files_root],
        reconcile_on_startup=False,
        train_after_new_annotations=1000,
    )
    service = BoxloopService(settings)
    try:
        service.setup(image_project.id, image_project.label_config)
        # a stored project Label Studio no longer has: logged, and the others still reconcile
        service.setup(999_999, image_project.label_config)
        reconciled: list[int] = []
        created: list[tuple[int, list[int]]] = []

        def reconcile() -> None:
            reconcile_all(
                service.store,
                service.studio.client,
                reconciled.append,
                lambda project, tasks: created.append((project, tasks)),
            )

        reconcile()
        assert reconciled == [image_project.id]
        assert created == [(image_project.id, ids)]  # as TASKS_CREATED would have sent them
        stored = service.store.list_annotations(image_project.id)
        assert sorted(a.annotation_id for a in stored) == sorted([first["id"], second["id"]])
        assert all(a.boxes is not None and len(a.boxes) > 0 for a in stored)
        assert sorted(t for t, _ in service.store.list_tasks(image_project.id)) == sorted(ids)

        delete_annotation(label_studio, second["id"])
        image = image_project.tasks[0]["data"]
        task = label_studio.client.tasks.create(project=image_project.id, data=dict(image))
        reconcile()
        assert created[1:] == [(image_project.id, [task.id])]  # only the task it did not hold
        kept = service.store.list_annotations(image_project.id)
        assert [a.annotation_id for a in kept] == [first["id"]]
        assert service.store.annotation_counts(image_project.id)["deleted"] == 1

        label_studio.client.tasks.delete(str(task.id))  # deleted in Label Studio: forgotten
        reconcile()
        assert sorted(t for t, _ in service.store.list_tasks(image_project.id)) == sorted(ids)
    finally:
        service.close()


def test_a_utility_score_is_merged_into_the_tasks_data_in_label_studio(
    label_studio: LabelStudioServer, image_project: ImageProject
) -> None:
    """The score goes into Label Studio's current data of the task: the rank an order pushed
    since the caller's copy stays, a task deleted meanwhile is skipped, an unchanged score is not
    written again."""
    from backend.labelstudio.queue import write_task_fields

    first, second = image_project.task_ids[:2]
    sdk = label_studio.client
    data = dict(sdk.tasks.get(str(first)).data)
    sdk.tasks.update(str(first), data={**data, "boxloop_rank": "000000005120"})
    sdk.tasks.delete(str(second))
    score = {"boxloop_utility": 0.25}
    written = write_task_fields(sdk, image_project.id, {first: score, second: score})
    assert written == 1
    assert dict(sdk.tasks.get(str(first)).data) == {
        **data,
        "boxloop_rank": "000000005120",
        "boxloop_utility": 0.25,
    }
    assert write_task_fields(sdk, image_project.id, {first: score}) == 0
