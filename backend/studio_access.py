"""How the backend reaches a project's Label Studio: its URL, the token, a client, image fetches.

One place decides which URL a project's token may go to, so the service, the training worker's
environment and every image fetch agree:

* the configured ``BOXLOOP_LABEL_STUDIO_URL`` wins; a ``/setup`` hostname is used only when it
  is on the allow-list (:func:`backend.images.trusted_studio_url`), never to send a token to a
  host a request named;
* the configured token wins; else the access token Label Studio sent with ``/setup``, kept in
  memory only (a restarted server waits for the next ``/setup``).
"""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import TYPE_CHECKING

from backend.images import ImageSource, image_source_for, trusted_studio_url
from backend.settings import Settings
from backend.store import Project, Store

if TYPE_CHECKING:
    from backend.labelstudio.client import StudioClient

__all__ = ["StudioAccess"]


class StudioAccess:
    """Label Studio URL, token, client and image source per project."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self._setup_tokens: dict[int, str] = {}
        self._clients: dict[tuple[str, str], StudioClient] = {}
        self._lock = threading.Lock()

    def remember_setup_token(self, project_id: int, token: str) -> None:
        """The access token ``/setup`` carried (used only where none is configured)."""
        self._setup_tokens[project_id] = token

    def token(self, project_id: int | None) -> str | None:
        if self.settings.label_studio_token is not None:
            return self.settings.label_studio_token.get_secret_value()
        return self._setup_tokens.get(project_id) if project_id is not None else None

    @property
    def configured(self) -> bool:
        """A URL and a token in the settings: the backend can reach Label Studio on its own."""
        return bool(self.settings.label_studio_url and self.settings.label_studio_token)

    def url(self, project: Project | None) -> str | None:
        """The configured Label Studio URL, else the /setup hostname if allow-listed (no SSRF)."""
        hostname = project.hostname if project else None
        return trusted_studio_url(
            self.settings.label_studio_url, hostname, self.settings.allowed_image_hosts
        )

    def client(self, project_id: int) -> StudioClient | None:
        """A client for the project's Label Studio, or None where URL or token is missing."""
        url = self.url(self.store.get_project(project_id))
        token = self.token(project_id)
        if not url or not token:
            return None
        return self._client(url, token)

    def _client(self, url: str, token: str) -> StudioClient:
        """One client per server and token: a personal access token's access token, refreshed
        by the SDK, is then fetched once, not at every image source."""
        from backend.labelstudio.client import StudioClient

        with self._lock:
            key = (url, token)
            if key not in self._clients:
                self._clients[key] = StudioClient(url, token)
            return self._clients[key]

    def worker_env(self, project_id: int) -> dict[str, str]:
        """``BOXLOOP_LABEL_STUDIO_*`` for a child process (training, bulk predict) of a project."""
        env: dict[str, str] = {}
        token = self.token(project_id)
        url = self.url(self.store.get_project(project_id))
        if token and url:
            env["BOXLOOP_LABEL_STUDIO_TOKEN"] = token
            env["BOXLOOP_LABEL_STUDIO_URL"] = url
        return env

    def image_source(self, project: Project | None) -> ImageSource:
        """Where and how a project's task images are fetched (token only to Label Studio, in
        the header the SDK sends it in: see :attr:`ImageSource.auth`), and the project whose
        cloud storages resolve ``s3://``/``gs://``/``azure-blob://`` images."""
        project_id = project.id if project else None
        url, token = self.url(project), self.token(project_id)
        return image_source_for(
            label_studio_url=self.settings.label_studio_url,
            setup_hostname=project.hostname if project else None,
            token=token,
            auth=self._client(url, token).auth_headers if url and token else None,
            allowed_local_roots=self.settings.allowed_local_roots,
            max_pixels=self.settings.max_image_pixels,
            max_bytes=self.settings.max_image_bytes,
            timeout_s=self.settings.image_fetch_timeout_s,
            allowed_hosts=self.settings.allowed_image_hosts,
            project_id=project_id,
        )

    def image_source_of(self, project_id: int | None) -> ImageSource:
        """:meth:`image_source` of a project id (None or unknown: no /setup hostname, no /setup
        token; the configured ones still apply). The id is kept even for a project boxloop has
        not stored, so its cloud storage URIs resolve with a configured URL and token."""
        project = self.store.get_project(project_id) if project_id is not None else None
        source = self.image_source(project)
        return source if source.project_id == project_id else replace(source, project_id=project_id)
