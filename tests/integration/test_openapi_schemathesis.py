"""The OpenAPI spec describes the server: a schemathesis run over every operation, in process,
against the server on SQLite and again on PostgreSQL (``backend_app``).

Passing means, for every generated request (schema-valid ones and schema-breaking ones):
no 5xx (``not_a_server_error``), no status the spec does not list for the route
(``status_code_conformance``), bodies and content types as documented
(``response_schema_conformance``, ``content_type_conformance``), and no schema-valid request
refused (``positive_data_acceptance``: only 2xx, 401, 403 or 404 may answer one).

Two things the spec states that JSON Schema cannot check get generators here:

* ``format: label-config`` -- a label config boxloop can serve (XML with a
  ``<RectangleLabels>`` on an ``<Image>``). A spec-shaped string that is not one gets a
  documented 422; the generator makes real ones, so valid requests are valid.
* ``/predict`` answers a batch whose every task failed with the worst task's status and one
  ``errors`` entry per task (a task's image is the caller's data, not the request's shape).
  There, :func:`predict_batch_not_refused` replaces ``positive_data_acceptance``: a 4xx to a
  valid batch must be that per-task verdict, never a refusal of the request itself.

Cases generated are counted per operation and printed (``-s``) at the end of the module.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.core import NotSet
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)

from backend.app import create_app
from backend.labelstudio.convert import LabelConfigError, parse_label_config
from backend.service import BoxloopService
from backend.settings import Settings
from tests.conftest import fresh_postgres_database

MAX_EXAMPLES = int(os.environ.get("BOXLOOP_SCHEMATHESIS_EXAMPLES", "25"))

_NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8)


@st.composite
def _label_configs(draw: st.DrawFn) -> str:
    labels = draw(st.lists(_NAME, min_size=1, max_size=4, unique=True))
    key = draw(_NAME)
    items = "".join(f'<Label value="{label}"/>' for label in labels)
    return (
        f'<View><Image name="img" value="${key}"/>'
        f'<RectangleLabels name="box" toName="img">{items}</RectangleLabels></View>'
    )


schemathesis.openapi.format("label-config", _label_configs())

CONFIG = SchemathesisConfig.from_dict(
    {
        # deterministic: the same cases every run (BOXLOOP_SCHEMATHESIS_EXAMPLES=500 explores more)
        "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "deterministic": True},
        "phases": {"stateful": {"enabled": False}},
    }
)

CASES: Counter[str] = Counter()
STATUSES: Counter[str] = Counter()


class _Plan:
    def to_dict(self) -> dict[str, Any]:
        return {"strategy": "random", "n_tasks": 0}


def _service(root: Path, database_url: str | None = None) -> BoxloopService:
    settings = Settings(
        data_dir=root / "data",
        database_url=database_url,
        allowed_local_roots=[root / "images"],
        reconcile_on_startup=False,
        train_after_new_annotations=1000,
        label_studio_url=None,
        label_studio_token=None,
    )
    service = BoxloopService(settings)
    # No training children and no feature extraction during the run: the scheduler stays
    # stopped (jobs are only queued) and ordering returns at once. HTTP is what is tested.
    # The ASGI client runs the app's lifespan around requests: keep the service up throughout.
    service.start = lambda: None  # type: ignore[method-assign]
    service.close = lambda: None  # type: ignore[method-assign]
    service.queue.order = lambda _pid, _req: _Plan()  # type: ignore[method-assign, assignment, return-value]
    return service


# Built at import: schemathesis parametrizes the test from the spec at collection time. The
# spec does not depend on the database; the requests go to the app of ``backend_app``.
ROOT = Path(tempfile.mkdtemp(prefix="boxloop-schemathesis-"))
SERVICE = _service(ROOT)
SQLITE_APP = create_app(SERVICE.settings, SERVICE)
schema = schemathesis.openapi.from_asgi("/openapi.json", SQLITE_APP, config=CONFIG)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def backend_app(request: pytest.FixtureRequest) -> Iterator[Any]:
    """The server on SQLite, then on a fresh PostgreSQL database: one request can pass on one
    and be a 500 on the other (PostgreSQL's text refuses NUL and its INTEGER is 32-bit, and
    SQLite enforces neither)."""
    if request.param == "sqlite":
        yield SQLITE_APP
        return
    root = Path(tempfile.mkdtemp(prefix="boxloop-schemathesis-pg-"))
    with fresh_postgres_database(request.getfixturevalue("postgres_server")) as url:
        service = _service(root, url)
        try:
            yield create_app(service.settings, service)
        finally:
            BoxloopService.close(service)
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def _summary() -> Iterator[None]:
    yield
    BoxloopService.close(SERVICE)
    shutil.rmtree(ROOT, ignore_errors=True)
    total = sum(CASES.values())
    summary = {"cases": total, "per_operation": dict(CASES), "statuses": dict(STATUSES)}
    print(f"\nschemathesis: {json.dumps(summary)}")


def _label_configs_in(case: Any) -> list[Any]:
    body = case.body if isinstance(case.body, dict) else {}
    if case.path == "/setup":
        return [body.get("schema")]
    if case.path == "/predict":
        return [body.get("label_config")]
    if case.path == "/webhook" and isinstance(body.get("project"), dict):
        return [body["project"].get("label_config")]
    return []


def _formats_hold(case: Any) -> bool:
    """Whether every ``format: label-config`` value is one (schemathesis draws some strings
    without the format's generator, e.g. in its coverage phase)."""
    for value in _label_configs_in(case):
        if value is None:
            continue
        try:
            parse_label_config(value)
        except (LabelConfigError, TypeError):
            return False
    return True


def predict_batch_not_refused(ctx: Any, response: Any, case: Any) -> bool | None:
    """/predict: a schema-valid batch gets 2xx, 401, 403 or 404, or -- when every task failed
    on its own -- that worst status with one ``errors`` entry per task."""
    status = response.status_code
    if 200 <= status < 300 or status in (401, 403, 404):
        return None
    body = json.loads(response.content or b"null")
    tasks = case.body.get("tasks") if isinstance(case.body, dict) else None
    errors = body.get("errors") if isinstance(body, dict) else None
    if not (isinstance(tasks, list) and isinstance(errors, list) and len(errors) == len(tasks)):
        raise AssertionError(f"valid /predict request refused: {status} {response.content[:300]!r}")
    assert max(e["status"] for e in errors) == status, body
    return None


def valid_request_not_refused(ctx: Any, response: Any, case: Any) -> bool | None:
    """``positive_data_acceptance`` for requests valid by the whole spec, formats included."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or not _formats_hold(case):
        return None
    if isinstance(case.body, NotSet) and case.operation.definition.raw.get("requestBody", {}).get(
        "required"
    ):
        # schemathesis's fuzzing phase can label a request without the body the spec requires
        # as positive (upstream issues #3360, #3949): that request is not valid by the spec
        return None
    if case.path == "/predict":
        return predict_batch_not_refused(ctx, response, case)
    return positive_data_acceptance(ctx, response, case)


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    valid_request_not_refused,
]


@schema.parametrize()
def test_the_server_keeps_its_openapi_spec(case: Any, backend_app: Any) -> None:
    response = case.call(app=backend_app)
    CASES[case.operation.label] += 1
    STATUSES[str(response.status_code)] += 1
    case.validate_response(response, checks=CHECKS)


def test_the_spec_names_every_error_it_can_answer(tmp_path: Path) -> None:
    """The spec lists each status a route can answer, and the requests the issue found refused
    are now either forbidden by the spec or accepted."""
    settings = Settings(data_dir=tmp_path / "data", reconcile_on_startup=False)
    spec = create_app(settings).openapi()
    paths = spec["paths"]
    for path, methods in paths.items():
        for method, operation in methods.items():
            codes = set(operation["responses"])
            assert {"401", "413"} <= codes, (method, path, codes)
            if method == "post":
                assert {"400", "422"} <= codes, (method, path, codes)
    assert {"403", "404", "413", "422", "502"} <= set(paths["/predict"]["post"]["responses"])
    assert "404" in paths["/train"]["post"]["responses"]
    schemas = spec["components"]["schemas"]
    # {"project": false} to /train: the spec asks for an integer id >= 1
    assert schemas["TrainRequest"]["properties"]["project"] == {
        "type": "integer",
        "minimum": 1,
        "maximum": 2**31 - 1,  # Label Studio's ids (Django AutoField) and the store's
        "title": "Project",
        "description": "Label Studio project id.",
    }
    # an empty schema to /setup: at least one character, and a label config at that
    setup_schema = schemas["SetupRequest"]["properties"]["schema"]
    assert setup_schema["minLength"] == 1 and setup_schema["format"] == "label-config"
    # {} to /webhook: every kind of event needs an action
    body = paths["/webhook"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    for ref in body["oneOf"]:
        event = schemas[ref["$ref"].rsplit("/", 1)[1]]
        assert "action" in event["required"]
    # the order request's defaults are this server's settings
    assert schemas["OrderRequest"]["properties"]["strategy"]["default"] == settings.order_strategy
    assert schemas["OrderRequest"]["properties"]["start"]["enum"] == ["labeled", "random"]


def test_auth_is_in_the_spec_when_configured(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", reconcile_on_startup=False, auth_token="t")
    spec = create_app(settings).openapi()
    assert spec["components"]["securitySchemes"] == {
        "bearerAuth": {"type": "http", "scheme": "bearer"}
    }
    assert spec["security"] == [{"bearerAuth": []}]
