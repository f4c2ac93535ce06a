"""Who may see the web view (SPEC §7): with a token, every page and API route needs it (a
bearer header, or the HttpOnly cookie the login form sets), a wrong one gets the login page
and no data, ``/healthz`` stays open; with TLS the same certificate serves HTTPS."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from grpc import aio

from monitor_svc.server import MonitorConfig, RunningMonitor, create_server
from stepflow_common import serving
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc
from tests.conftest import FAST_TIMERS
from tests.helpers import manager_with_steps
from tests.process_helpers import Certs, make_certs

pytestmark = pytest.mark.timeout(60)

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


async def start(tmp_path: Path, security: serving.Security) -> RunningMonitor:
    return await create_server(
        MonitorConfig(
            database_url=f"sqlite:///{tmp_path / 'web.db'}", port=0, http_port=0,
            timers=FAST_TIMERS, security=security, shutdown_grace_s=1.0,
        )
    )  # fmt: skip


@pytest.fixture
async def guarded(tmp_path: Path) -> AsyncIterator[RunningMonitor]:
    running = await start(tmp_path, serving.Security(auth_token=TOKEN))
    try:
        yield running
    finally:
        await running.stop(grace=0.5)


async def a_manager(running: RunningMonitor) -> str:
    async with aio.insecure_channel(running.address) as channel:
        stub = _Authed(m_grpc.MonitorServiceStub(channel))
        manager, _ = await manager_with_steps(stub, 1)  # type: ignore[arg-type]
        return manager.id


class _Authed:
    """A stub whose every call carries the monitor's token."""

    def __init__(self, stub: m_grpc.MonitorServiceStub) -> None:
        self._stub = stub

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        method = getattr(self._stub, name)

        def call(request, **kw):  # type: ignore[no-untyped-def]
            return method(request, metadata=[("authorization", f"Bearer {TOKEN}")], **kw)

        return call


async def test_without_the_token_nothing_but_the_login_page_and_health(
    guarded: RunningMonitor,
) -> None:
    assert guarded.web is not None
    manager_id = await a_manager(guarded)
    async with aiohttp.ClientSession(guarded.web.url) as http:
        for path in (
            "/api/v1/jobs",
            f"/api/v1/jobs/{manager_id}",
            f"/api/v1/jobs/{manager_id}/log",
            f"/api/v1/jobs/{manager_id}/events",
            "/api/v1/managers/events",
        ):
            async with http.get(path) as resp:
                assert resp.status == 401, path
                assert manager_id not in await resp.text()
        async with http.post(f"/api/v1/jobs/{manager_id}/cancel") as resp:
            assert resp.status == 401
        async with http.get("/api/v1/jobs", headers={"Authorization": "Bearer wrong"}) as resp:
            assert resp.status == 401
        for page in ("/", f"/jobs/{manager_id}"):
            async with http.get(page, allow_redirects=False) as resp:
                assert resp.status == 303
                assert resp.headers["Location"].startswith("/login?next=")
        async with http.get("/healthz") as resp:
            assert resp.status == 200
        async with http.post("/login", data={"token": "wrong", "next": "/"}) as resp:
            assert resp.status == 401
            body = await resp.text()
            assert "data-login-error" in body and manager_id not in body
            assert not any(name.startswith("stepflow_session_") for name in resp.cookies)


async def test_a_bearer_header_or_the_login_cookie_opens_everything(
    guarded: RunningMonitor,
) -> None:
    assert guarded.web is not None
    manager_id = await a_manager(guarded)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        aiohttp.ClientSession(guarded.web.url) as http,
        http.get(f"/api/v1/jobs/{manager_id}", headers=bearer) as resp,
    ):
        assert resp.status == 200
        assert (await resp.json())["id"] == manager_id
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for 127.0.0.1
    async with aiohttp.ClientSession(guarded.web.url, cookie_jar=jar) as http:
        form = {"token": TOKEN, "next": f"/jobs/{manager_id}"}
        async with http.post("/login", data=form, allow_redirects=False) as resp:
            assert resp.status == 303
            assert resp.headers["Location"] == f"/jobs/{manager_id}"
            set_cookie = resp.headers["Set-Cookie"]
        assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie
        port = guarded.web.port
        assert set_cookie.startswith(f"stepflow_session_{port}=")  # one per web view
        assert TOKEN not in set_cookie  # a value derived from the token, not the token
        async with http.get(f"/jobs/{manager_id}", allow_redirects=False) as resp:
            assert resp.status == 200
        async with http.get("/api/v1/jobs") as resp:
            assert [j["id"] for j in (await resp.json())["jobs"]] == [manager_id]
        # A login form never sends anyone to another site, however the address is spelled.
        for elsewhere in ("//evil.example/", "/\t/evil.example", "/\\evil.example", "https://x.y/"):
            form = {"token": TOKEN, "next": elsewhere}
            async with http.post("/login", data=form, allow_redirects=False) as resp:
                assert resp.headers["Location"] == "/", elsewhere
        async with http.get("/login", params={"next": "/\n/evil.example"}) as resp:
            assert 'name="next" value="/"' in await resp.text()


async def test_https_with_the_grpc_certificate(tmp_path: Path, certs: Certs) -> None:
    security = serving.Security(tls_cert=str(certs.server_cert), tls_key=str(certs.server_key))
    running = await start(tmp_path, security)
    try:
        assert running.web is not None and running.web.url.startswith("https://")
        trusted = ssl.create_default_context(cafile=str(certs.ca))
        async with aiohttp.ClientSession(running.web.url) as http:
            async with http.get("/api/v1/jobs", ssl=trusted) as resp:
                assert resp.status == 200
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await http.get("/api/v1/jobs", ssl=ssl.create_default_context())
    finally:
        await running.stop(grace=0.5)


async def test_no_other_origin_may_cancel_and_only_loopback_names_are_answered(
    tmp_path: Path,
) -> None:
    running = await start(tmp_path, serving.Security())
    try:
        assert running.web is not None
        manager_id = await a_manager(running)
        url = running.web.url
        async with aiohttp.ClientSession(url) as http:
            headers = {"Origin": "http://evil.example"}
            async with http.post(f"/api/v1/jobs/{manager_id}/cancel", headers=headers) as resp:
                assert resp.status == 403
            async with http.get(f"/api/v1/jobs/{manager_id}") as resp:
                assert (await resp.json())["status"] == "JOB_STATUS_PENDING"  # untouched
            # A page that rebinds its own name to 127.0.0.1 is not answered.
            async with http.get("/api/v1/jobs", headers={"Host": "evil.example"}) as resp:
                assert resp.status == 421
            # The page's own origin may.
            headers = {"Origin": url}
            async with http.post(f"/api/v1/jobs/{manager_id}/cancel", headers=headers) as resp:
                assert resp.status == 200
    finally:
        await running.stop(grace=0.5)
