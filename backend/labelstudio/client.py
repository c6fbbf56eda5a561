"""A thin, typed wrapper around ``label-studio-sdk`` for what the backend asks of Label Studio.

Why a wrapper and not the SDK directly: the SDK returns pydantic models whose shape differs by
user role (``RoleBasedTask`` is a union), paginates by running into a 404, and sends the token in
a header form that depends on the token's shape (legacy ``Token <t>`` versus a JWT personal access
token exchanged for ``Bearer <access>``). The engine wants plain dicts, all pages, and one place
that knows how to authenticate image downloads, so that is all this module offers.

The token is a secret: it never appears in ``repr``, ``str`` or log lines, and it is only sent to
the Label Studio host itself (see :meth:`StudioClient.image_request`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError
from label_studio_sdk.core.request_options import RequestOptions
from label_studio_sdk.types import PredictionRequest
from pydantic import SecretStr

log = logging.getLogger(__name__)

#: Page size for task listing: large enough to keep round trips few on big projects, small
#: enough that one page of tasks with their annotations stays a few MB.
PAGE_SIZE = 100
#: Label Studio's Data Manager cuts a task's ``predictions_model_versions`` at this many characters.
_VERSIONS_CUT = 500


class StudioError(RuntimeError):
    """A Label Studio call failed in a way the caller should report (not a bug in boxloop)."""


class StudioClient:
    """Label Studio access for one server and one token.

    ``token`` is the legacy API token (Account & Settings → Legacy Token; needs
    ``LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true`` on the server) or a personal access token
    (a JWT refresh token; the SDK exchanges it for short-lived access tokens itself).
    """

    def __init__(
        self,
        url: str,
        token: str | SecretStr,
        *,
        timeout_s: float = 60.0,
        max_retries: int = 2,
        page_size: int = PAGE_SIZE,
    ) -> None:
        if not url:
            raise ValueError("Label Studio URL is empty")
        secret = token.get_secret_value() if isinstance(token, SecretStr) else token
        if not secret:
            raise ValueError("Label Studio token is empty")
        self.url = url.rstrip("/")
        self.page_size = page_size
        self.sdk = LabelStudio(
            base_url=self.url,
            api_key=secret,
            timeout=timeout_s,
            max_retries=max_retries,
        )

    @classmethod
    def of(cls, client: LabelStudio | StudioClient) -> StudioClient:
        """``client`` itself, or a client over that SDK client: its server, its token (refreshed
        by the SDK as before) and its HTTP client. For code handed the bare SDK (the queue push)
        that imports predictions: :meth:`import_predictions` is the one import that is not sent
        twice."""
        if isinstance(client, StudioClient):
            return client
        studio = cls.__new__(cls)
        studio.url = client._client_wrapper.get_base_url().rstrip("/")
        studio.page_size = PAGE_SIZE
        studio.sdk = client
        return studio

    def __repr__(self) -> str:
        return f"StudioClient(url={self.url!r}, token='**********')"

    __str__ = __repr__

    # ------------------------------------------------------------------ auth & images
    # These two read the SDK's token state (private attributes of label-studio-sdk 2.1.2, pinned;
    # tests/e2e/test_studio_client.py fails if an upgrade moves them) so that image downloads
    # authenticate exactly as the SDK's own API calls do, PATs included.
    @property
    def uses_legacy_token(self) -> bool:
        """True when the token is sent as ``Token <t>`` (not a JWT personal access token)."""
        return bool(self.sdk._client_wrapper._tokens_client._use_legacy_token)

    def auth_headers(self) -> dict[str, str]:
        """The ``Authorization`` header Label Studio wants, as the SDK would send it now.

        ``{"Authorization": "Token <t>"}`` for a legacy token; for a personal access token
        ``Bearer <access>``, refreshed by the SDK when it has expired (so call this per request,
        do not cache the result for long).
        """
        headers = self.sdk._client_wrapper.get_headers()
        return {"Authorization": headers["Authorization"]}

    def absolute_url(self, url: str) -> str:
        """Resolve a task's image reference against the server (tasks hold relative paths)."""
        return urljoin(self.url + "/", url)

    def is_studio_url(self, url: str) -> bool:
        """Whether ``url`` (absolute or relative) points at this Label Studio server."""
        target = urlsplit(self.absolute_url(url))
        base = urlsplit(self.url)
        return (target.scheme, target.netloc) == (base.scheme, base.netloc)

    def image_request(self, url: str) -> tuple[str, dict[str, str]]:
        """``(absolute_url, headers)`` for downloading one task image.

        The token goes only to the Label Studio host: an image on some other host (a public
        bucket, a CDN) is fetched without it, so a task cannot exfiltrate the token by naming
        an attacker's URL.
        """
        absolute = self.absolute_url(url)
        headers = self.auth_headers() if self.is_studio_url(absolute) else {}
        return absolute, headers

    # ------------------------------------------------------------------ projects & tasks
    def get_project(self, project_id: int) -> dict[str, Any]:
        """The project as a dict (``label_config``, ``model_version``, ``sampling``, ...)."""
        project = self.sdk.projects.get(project_id)
        return _as_dict(project)

    def iter_tasks(self, project_id: int, *, with_annotations: bool) -> Iterator[dict[str, Any]]:
        """All tasks of a project in id order, each as a dict (Label Studio's JSON), listed by
        the id cursor of :meth:`_iter_by_id`.

        With ``with_annotations`` the tasks carry their ``annotations`` (and ``predictions``):
        one paginated pass instead of one request per task.
        """
        params = {"fields": "all" if with_annotations else "task_only"}
        yield from self._iter_by_id(project_id, params)

    def _iter_by_id(
        self,
        project_id: int,
        params: Mapping[str, str],
        page_size: int | None = None,
        *,
        after: int = 0,
        upto: int | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Every task of the project as the Data Manager's ``/api/tasks/`` lists it (``params``
        pick the fields), in id order; only ids ``> after`` and ``<= upto`` where given. Pages
        follow an id cursor (``id >`` the last seen, first page each time), so tasks created or
        deleted meanwhile never shift a page: with page numbers, a task deleted while the list
        was read moved every later task up one place, and one of them was never listed (a
        reconcile then tombstoned its annotations, a task sync missed the task).

        The listing ends when a page holds every task the server counted past the cursor
        (``total``), or is empty: a page shorter than asked is not the end, as the server may cap
        the page size (``TASK_API_PAGE_SIZE_MAX``)."""
        size = page_size or self.page_size
        last = after
        cursor = {"filter": "filter:tasks:id", "type": "Number"}
        while True:
            items: list[dict[str, Any]] = [{**cursor, "operator": "greater", "value": last}]
            if upto is not None:
                items.append({**cursor, "operator": "less_or_equal", "value": upto})
            query = {"filters": {"conjunction": "and", "items": items}, "ordering": ["tasks:id"]}
            response = _get_retrying(
                self._http,
                f"{self.url}/api/tasks/",
                params={
                    "project": project_id,
                    "page": 1,
                    "page_size": size,
                    **params,
                    "query": json.dumps(query),
                },
                headers=self.auth_headers(),
                timeout=self.sdk._client_wrapper.get_timeout(),
            )
            # Page 1 is never past the end (an empty one is a 200): a 404 means the project
            # is gone or the URL is wrong, never "no more tasks".
            if response.status_code != 200:
                raise StudioError(
                    f"listing tasks of project {project_id}: HTTP {response.status_code}: "
                    f"{response.text[:300]}"
                )
            try:
                body = response.json()
                tasks = body.get("tasks") or []
            except (ValueError, AttributeError) as exc:
                raise StudioError(
                    f"listing tasks of project {project_id}: not a task list "
                    f"({type(exc).__name__}): {response.text[:200]}"
                ) from exc
            yield from tasks
            total = body.get("total")
            if not tasks or (isinstance(total, int) and len(tasks) >= total):
                return
            last = max(int(t["id"]) for t in tasks)

    @property
    def _http(self) -> httpx.Client:
        """The SDK's own HTTP client: its connection pool, and whatever transport it was given."""
        return self.sdk._client_wrapper.httpx_client.httpx_client

    def iter_task_versions(
        self, project_id: int, *, page_size: int | None = None
    ) -> Iterator[dict[str, Any]]:
        """Every task as ``{"id", "data", "model_versions": [...] or None}`` in id order, where
        ``model_versions`` are the versions of the task's predictions, None when unknown.

        Why this query: the Data Manager's per-task ``predictions_model_versions`` aggregate is
        the only cheap way to learn which versions a task has (``include`` keeps each task to
        three fields; its *filters* on that column compare the joined string or characters, so
        they cannot be trusted). Label Studio joins the versions with ", " on PostgreSQL and ","
        on SQLite, and cuts the string at 500 characters: a cut list is unknown (None).
        """
        params = {"fields": "all", "include": "id,data,predictions_model_versions"}
        for task in self._iter_by_id(project_id, params, page_size):
            yield {
                "id": int(task["id"]),
                "data": dict(task.get("data") or {}),
                "model_versions": model_versions(task.get("predictions_model_versions")),
            }

    def import_predictions(
        self,
        project_id: int,
        model_version: str,
        predictions: Sequence[tuple[int, list[dict[str, Any]], float]],
    ) -> list[int]:
        """Import ``(task_id, result, score)`` predictions of ``model_version`` in one request;
        the tasks must not have a prediction of ``model_version`` yet.

        Label Studio rejects the whole request when one task no longer exists (deleted since it
        was listed); then the tasks that are gone are found, left out, and the rest imported.
        Returns the ids of the deleted tasks (usually none).

        Not imported twice: the SDK would send the request again after a 5xx or a dropped
        connection, but a proxy's 502/504 can come after Label Studio stored the predictions.
        So the SDK does not retry here; after a failed request the tasks that now have a
        prediction of ``model_version`` are left out of the next try (two waits, as listings).
        """
        pending = {
            int(task_id): PredictionRequest(
                task=int(task_id), result=result, score=float(score), model_version=model_version
            )
            for task_id, result, score in predictions
        }
        gone: list[int] = []
        waits = iter(_RETRY_WAITS_S)
        while pending:
            try:
                self.sdk.projects.import_predictions(
                    project_id,
                    request=list(pending.values()),
                    request_options=RequestOptions(max_retries=0),
                )
                break
            except ApiError as exc:
                if exc.status_code == 400 and "task" in str(exc.body):
                    missing = [t for t in pending if not self.task_exists(t)]
                    if not missing:
                        raise StudioError(
                            f"Label Studio refused predictions for project {project_id}"
                        ) from exc
                    gone += missing
                    pending = {t: r for t, r in pending.items() if t not in set(missing)}
                else:
                    wait = next(waits, None) if _retryable(exc.status_code) else None
                    if wait is None:
                        raise
                    log.warning(
                        "project %s: importing predictions: HTTP %s; trying again in %.1f s",
                        project_id,
                        exc.status_code,
                        wait,
                    )
                    time.sleep(wait)
            except httpx.TransportError as exc:
                wait = next(waits, None)
                if wait is None:
                    raise
                log.warning(
                    "project %s: importing predictions failed (%s); trying again in %.1f s",
                    project_id,
                    exc,
                    wait,
                )
                time.sleep(wait)
            # The failed request may have been stored, whole or in part (Label Studio imports
            # in batches of 500 behind a feature flag): what is there now is not sent again.
            if pending:
                stored = self._tasks_with_version(project_id, model_version, list(pending))
                pending = {t: r for t, r in pending.items() if t not in stored}
        if gone:
            log.info("project %s: %d tasks deleted meanwhile, not predicted", project_id, len(gone))
        return gone

    def _tasks_with_version(
        self, project_id: int, model_version: str, task_ids: Sequence[int]
    ) -> set[int]:
        """Those of ``task_ids`` that have a prediction of ``model_version`` (one listing of
        their id range; a task whose listed versions were cut is asked on its own)."""
        wanted = {int(t) for t in task_ids}
        if not wanted:
            return set()
        params = {"fields": "all", "include": "id,predictions_model_versions"}
        found: set[int] = set()
        listing = self._iter_by_id(project_id, params, after=min(wanted) - 1, upto=max(wanted))
        for task in listing:
            task_id = int(task["id"])
            if task_id not in wanted:
                continue
            versions = model_versions(task.get("predictions_model_versions"))
            if versions is None:
                versions = list(self.task_versions(task_id))
            if model_version in versions:
                found.add(task_id)
        return found

    def task_versions(self, task_id: int) -> set[str]:
        """The model versions of one task's predictions (where the listing's were cut)."""
        return {
            str(_as_dict(p).get("model_version") or "")
            for p in self.sdk.predictions.list(task=int(task_id))
        }

    def task_exists(self, task_id: int) -> bool:
        try:
            self.sdk.tasks.get(str(int(task_id)))
        except ApiError as exc:
            if exc.status_code == 404:
                return False
            raise
        return True

    def list_tasks(self, project_id: int) -> list[dict[str, Any]]:
        """``[{"id": ..., "data": {...}}, ...]`` for every task of the project, by id (listed
        by the id cursor of :meth:`_iter_by_id`, so tasks created or deleted meanwhile shift
        no other out of the list)."""
        params = {"fields": "task_only", "include": "id,data"}
        tasks = [
            {"id": int(t["id"]), "data": dict(t.get("data") or {})}
            for t in self._iter_by_id(project_id, params)
        ]
        return sorted(tasks, key=lambda t: t["id"])

    def list_annotations(self, project_id: int) -> list[dict[str, Any]]:
        """Every annotation of every task of the project (cancelled ones included), by id.

        Used to reconcile after missed webhooks: Label Studio sends webhooks once, with a 1 s
        timeout and no retry. Each dict is Label Studio's annotation (``id``, ``task``,
        ``result``, ``was_cancelled``, ``updated_at``, ...), with ``task`` and ``project``
        filled in even where the list endpoint leaves them out.
        """
        found: dict[int, dict[str, Any]] = {}
        for task in self._iter_by_id(project_id, {"fields": "all"}):
            task_id = int(task["id"])
            items = task.get("annotations") or []
            if any("result" not in a for a in items):
                # Some servers return lightweight stubs here (a lazy-loading feature flag);
                # ask for this task's annotations in full.
                items = [_as_dict(a) for a in self.sdk.annotations.list(task_id)]
            for annotation in items:
                record = dict(annotation)
                record["task"] = task_id
                record["project"] = project_id
                found[int(record["id"])] = record
        return [found[k] for k in sorted(found)]

    # ------------------------------------------------------------------ ML backend
    def list_backends(self, project_id: int) -> list[dict[str, Any]]:
        """The ML backends connected to a project."""
        return [_as_dict(b) for b in self.sdk.ml.list(project=project_id)]

    def find_backends(
        self, project_id: int, backend_url_or_id: str | int | None
    ) -> list[dict[str, Any]]:
        """The project's ML backends with this id, or whose URL equals this URL (slash-blind).

        ``None`` means every backend of the project (boxloop expects to be the only one). A URL
        can match several: Label Studio lets the same backend be connected twice. Raises
        :class:`StudioError` when nothing matches, listing what is connected.
        """
        backends = self.list_backends(project_id)
        if backend_url_or_id is None:
            matches = backends
        elif isinstance(backend_url_or_id, int) or str(backend_url_or_id).isdigit():
            wanted_id = int(backend_url_or_id)
            matches = [b for b in backends if b.get("id") == wanted_id]
        else:
            wanted_url = _normalise_url(str(backend_url_or_id))
            matches = [b for b in backends if _normalise_url(str(b.get("url", ""))) == wanted_url]
        if not matches:
            known = ", ".join(f"{b.get('id')}={b.get('url')}" for b in backends) or "none"
            raise StudioError(
                f"project {project_id} has no ML backend {backend_url_or_id!r} (connected: {known})"
            )
        return matches

    def set_backend_title(
        self, project_id: int, backend_url_or_id: str | int | None, title: str
    ) -> dict[str, Any]:
        """Rename the project's ML backend(s) to ``title`` (the served model version).

        Why: Label Studio sets the project's ``model_version`` to the backend's title, and
        uncertainty sampling and "skip tasks that already have this version's prediction" both
        compare against it. Keeping title == served version keeps the queue order and the
        prediction cache right after a retrain.

        Label Studio validates the backend on this PATCH (it calls the backend's ``/health`` and
        ``/setup``, several times), so a backend calling this about itself must not block the
        thread that serves those requests: call it from a worker thread. Returns the (last)
        updated backend; afterwards the project's ``model_version`` equals ``title``.
        """
        updated: dict[str, Any] = {}
        for backend in self.find_backends(project_id, backend_url_or_id):
            if backend.get("title") == title:
                updated = backend
                continue
            # Label Studio 1.23.2 answers 500 ("healthcheck_() missing ... 'url'") to a PATCH
            # that leaves the URL out: it re-validates the backend with the body's URL.
            result = self.sdk.ml.update(
                int(backend["id"]), url=str(backend["url"]), project=project_id, title=title
            )
            updated = _as_dict(result)
            log.info("ML backend %s of project %s renamed to %r", backend["id"], project_id, title)
        # Label Studio moves the project's model_version with a renamed backend only if it still
        # equalled the old title (ml/models.py, MLBackend.save); it may have been changed by
        # hand or cleared since. The project accepts "", a backend title, or a version that
        # stored predictions carry, so setting it to this backend's new title is always valid.
        if self.get_project(project_id).get("model_version") != title:
            self.sdk.projects.update(id=project_id, model_version=title)
        return updated

    # ------------------------------------------------------------------ data manager
    def retrieve_predictions(
        self, project_id: int, task_ids: list[int] | None = None, *, timeout_s: float = 300.0
    ) -> dict[str, Any]:
        """Run the Data Manager action "Retrieve Predictions" and wait for it.

        Synchronous on a server without Redis: Label Studio calls the backend's ``/predict``
        for the selected tasks before answering. (The SDK's ``ml.predict_all_tasks`` answers 404
        in the open-source edition.)
        """
        selected: dict[str, Any] = (
            {"all": True, "excluded": []}
            if task_ids is None
            else {"all": False, "included": [int(t) for t in task_ids]}
        )
        response = self.sdk.actions.with_raw_response.create(
            id="retrieve_tasks_predictions",
            project=project_id,
            selected_items=selected,  # type: ignore[arg-type]
            request_options=RequestOptions(timeout=timeout_s, max_retries=0),
        )
        try:
            body = response.response.json()
        except ValueError:
            body = {}
        return body if isinstance(body, dict) else {"response": body}


def local_files_path(url: str) -> str | None:
    """The relative path in a ``/data/local-files/?d=<path>`` URL, else ``None``.

    A backend that can read the same directory (``BOXLOOP_ALLOWED_LOCAL_ROOTS`` holding Label
    Studio's ``LOCAL_FILES_DOCUMENT_ROOT``) may open the file directly instead of downloading it.
    The value comes from task data: resolve ``root / path`` and check it is still under ``root``
    before reading (``d=../../etc/passwd`` is a valid query string).
    """
    parts = urlsplit(url)
    if not parts.path.endswith("/data/local-files/") and parts.path != "/data/local-files":
        return None
    values = parse_qs(parts.query).get("d")
    return values[0] if values else None


def _normalise_url(url: str) -> str:
    return url.strip().rstrip("/").lower()


#: Waits before the retries of a listing request (as the SDK retries its own requests).
_RETRY_WAITS_S = (0.5, 2.0)


def _retryable(status: int | None) -> bool:
    """An answer the SDK would send its request again after (as ``_should_retry`` does)."""
    return status is not None and (status >= 500 or status in (408, 409, 429))


def _get_retrying(http: httpx.Client, url: str, **kwargs: Any) -> httpx.Response:
    """``http.get`` tried again after a transport error or a 5xx (a proxy restarting, a worker
    recycled): one such answer would otherwise end a bulk run of thousands of tasks. The last
    answer or error stands."""
    for wait in _RETRY_WAITS_S:
        try:
            response = http.get(url, **kwargs)
        except httpx.TransportError as exc:
            log.warning("GET %s failed (%s); trying again in %.1f s", url, exc, wait)
        else:
            if response.status_code < 500:
                return response
            log.warning("GET %s: HTTP %s; trying again in %.1f s", url, response.status_code, wait)
        time.sleep(wait)
    return http.get(url, **kwargs)


def model_versions(listed: Any) -> list[str] | None:
    """A task's ``predictions_model_versions`` as the Data Manager lists it, as a list: joined
    with ", " on PostgreSQL and "," on SQLite, and cut at 500 characters (None: unknown)."""
    text = str(listed or "")
    if len(text) >= _VERSIONS_CUT:
        return None
    return [v.strip() for v in text.split(",") if v.strip()]


def _as_dict(value: Any) -> dict[str, Any]:
    """SDK models (pydantic, ``extra=allow``) and plain dicts to a JSON-ready dict."""
    if isinstance(value, dict):
        return dict(value)
    result = value.model_dump(mode="json", by_alias=True)
    if not isinstance(result, dict):
        raise TypeError(f"cannot turn {type(value).__name__} into a dict")
    return result
