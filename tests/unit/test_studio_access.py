"""Which Label Studio URL and token a project's calls, child processes and image fetches use."""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr

from backend.settings import Settings
from backend.store import Store
from backend.studio_access import StudioAccess


def _access(tmp_path: Path, **settings: object) -> StudioAccess:
    values: dict[str, object] = {
        "data_dir": tmp_path,
        "database_url": f"sqlite:///{tmp_path / 'state.db'}",
        "label_studio_url": None,
        "label_studio_token": None,
        "reconcile_on_startup": False,
        **settings,
    }
    config = Settings(**values)  # type: ignore[arg-type]
    store = Store(config.resolved_database_url)
    for project_id, hostname in ((1, "http://ls.internal:8080"), (2, "http://10.0.0.9:8080")):
        store.upsert_project(
            project_id,
            label_config="<View/>",
            from_name="label",
            to_name="image",
            image_key="image",
            labels=["cat"],
            hostname=hostname,
        )
    return StudioAccess(config, store)


def test_setup_token_reaches_only_an_allow_listed_setup_host(tmp_path: Path) -> None:
    access = _access(tmp_path, allowed_image_hosts=["ls.internal:8080"])
    assert not access.configured
    assert access.client(1) is None and access.worker_env(1) == {}  # no token yet
    access.remember_setup_token(1, "setup-1")
    access.remember_setup_token(2, "setup-2")
    client = access.client(1)
    assert client is not None and client.url == "http://ls.internal:8080"
    assert access.worker_env(1) == {
        "BOXLOOP_LABEL_STUDIO_TOKEN": "setup-1",
        "BOXLOOP_LABEL_STUDIO_URL": "http://ls.internal:8080",
    }
    # project 2's /setup named a host nobody allowed: its token goes nowhere
    assert access.url(access.store.get_project(2)) is None
    assert access.client(2) is None and access.worker_env(2) == {}
    assert access.image_source_of(2).label_studio_url is None
    assert access.image_source_of(1).label_studio_url == "http://ls.internal:8080"
    assert access.image_source_of(None).token is None


def test_configured_url_and_token_win_over_setup(tmp_path: Path) -> None:
    access = _access(
        tmp_path,
        label_studio_url="http://studio:8080",
        label_studio_token=SecretStr("configured"),
        allowed_image_hosts=["ls.internal:8080"],
    )
    access.remember_setup_token(1, "setup-1")
    assert access.configured and access.token(1) == "configured" and access.token(None)
    assert access.worker_env(1)["BOXLOOP_LABEL_STUDIO_URL"] == "http://studio:8080"
    assert access.image_source_of(1).token == "configured"


def test_images_are_fetched_with_the_header_the_sdk_sends_a_personal_access_token_in(
    tmp_path: Path,
) -> None:
    """The API calls sent a personal access token's access token as ``Bearer``, but image
    fetches sent the PAT as ``Token <PAT>``: Label Studio refused them (legacy tokens are off by
    default in 1.23), and every task of the project failed with a 403."""
    import io
    import time
    import types

    import httpx
    import jwt
    from PIL import Image

    from backend.images import read_image_bytes

    claims = {"exp": int(time.time()) + 3600, "user_id": 1}
    pat = jwt.encode({**claims, "token_type": "refresh"}, "k" * 32, algorithm="HS256")
    access = jwt.encode({**claims, "token_type": "access"}, "k" * 32, algorithm="HS256")
    studio = _access(tmp_path, label_studio_url="http://ls:8080", label_studio_token=pat)
    client = studio.client(1)
    assert client is not None and studio.client(1) is client  # one client: one access token
    tokens = client.sdk._client_wrapper._tokens_client  # the SDK's POST /api/token/refresh/
    tokens.refresh = lambda *a, **k: types.SimpleNamespace(access=access)
    seen: list[str] = []

    def label_studio(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization", ""))
        if seen[-1] != f"Bearer {access}":
            return httpx.Response(401, json={"detail": "Authentication credentials invalid"})
        png = io.BytesIO()
        Image.new("RGB", (4, 3)).save(png, "PNG")
        return httpx.Response(200, content=png.getvalue(), headers={"content-type": "image/png"})

    source = studio.image_source(studio.store.get_project(1))
    http = httpx.Client(transport=httpx.MockTransport(label_studio))
    assert read_image_bytes("/data/upload/1/a.png", source, client=http).startswith(b"\x89PNG")
    assert seen == [f"Bearer {access}"]
