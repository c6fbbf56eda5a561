"""Smoke test of the Label Studio fixture, and a record of how a backend reaches task images.

What this pins down for the backend: tasks imported through a local storage carry
``/data/local-files/?d=<path under LOCAL_FILES_DOCUMENT_ROOT>``, relative to the Label Studio
URL; fetching one needs ``Authorization: Token <token>`` (401 without); the relative path maps
1:1 onto the document root, so a backend allowed to read that directory may skip HTTP.
"""

from __future__ import annotations

import io

import httpx
import pytest
from PIL import Image

from backend.labelstudio.client import local_files_path
from tests.e2e.conftest import ImageProject, LabelStudioServer, create_image_project

pytestmark = pytest.mark.e2e


def test_label_studio_is_up_and_token_works(label_studio: LabelStudioServer) -> None:
    health = httpx.get(f"{label_studio.url}/health", timeout=5)
    assert health.status_code == 200
    assert health.json() == {"status": "UP"}

    me = httpx.get(
        f"{label_studio.url}/api/current-user/whoami",
        headers=label_studio.auth_headers,
        timeout=10,
    )
    assert me.status_code == 200, me.text
    assert me.json()["email"] == label_studio.username
    # The SDK sends a non-JWT key as a legacy token: the same header form.
    assert label_studio.studio.auth_headers() == label_studio.auth_headers
    assert httpx.get(f"{label_studio.url}/api/projects/", timeout=10).status_code == 401


def test_project_with_local_storage_tasks(
    label_studio: LabelStudioServer, image_project: ImageProject
) -> None:
    project = label_studio.studio.get_project(image_project.id)
    assert project["label_config"] == image_project.label_config
    for label in image_project.labels:
        assert f'"{label}"' in project["label_config"]

    assert len(image_project.tasks) == 6
    for task in image_project.tasks:
        image_url = task["data"]["image"]
        assert image_url.startswith("/data/local-files/?d="), image_url
        rel = local_files_path(image_url)
        assert rel is not None
        # The relative path is the file's place under the document root.
        on_disk = label_studio.files_root / rel
        assert on_disk.is_file()
        assert on_disk == image_project.images[int(task["id"])].path


def test_task_image_is_fetched_with_the_token(
    label_studio: LabelStudioServer, image_project: ImageProject
) -> None:
    task = image_project.tasks[0]
    source = image_project.images[int(task["id"])]
    url, headers = label_studio.studio.image_request(task["data"]["image"])
    assert url.startswith(label_studio.url + "/data/local-files/?d=")
    assert headers == {"Authorization": f"Token {label_studio.token}"}

    with httpx.Client(timeout=30) as http:
        anonymous = http.get(url)
        assert anonymous.status_code == 401
        fetched = http.get(url, headers=headers)
    assert fetched.status_code == 200, fetched.text[:300]
    assert fetched.content == source.path.read_bytes()
    with Image.open(io.BytesIO(fetched.content)) as image:
        assert image.size == (source.width, source.height)


def test_second_project_gets_its_own_files(label_studio: LabelStudioServer) -> None:
    project = create_image_project(label_studio, 2, title="e2e second project")
    assert len(project.tasks) == 2
    assert all(p.path.parent == project.storage_dir for p in project.images.values())
    for task in project.tasks:
        rel = local_files_path(task["data"]["image"])
        assert rel is not None and rel.startswith(project.storage_dir.name + "/")
