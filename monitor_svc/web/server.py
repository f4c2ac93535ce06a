"""The web view's aiohttp application, served from the monitor's event loop beside gRPC.

aiohttp because it runs on the asyncio loop grpc.aio already runs (no second loop, no
threads), streams responses as they are written (Server-Sent Events, NDJSON), and is one
well-kept dependency. The pages are static files; what they show comes from the JSON API and
the event streams, which call the monitor through its public RPCs on a private socket."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from monitor_svc.web import api, auth
from monitor_svc.web.feeds import Feeds
from stepflow_client.aio import MonitorClient

log = structlog.get_logger(__name__)

STATIC = Path(__file__).parent / "static"
SHUTDOWN_S = 1.0  # open event streams get this long to end when the monitor stops
NO_STORE = {"Cache-Control": "no-store"}


class CannotServeWeb(OSError):
    """The web view's port could not be listened on."""


@dataclass(frozen=True, slots=True)
class WebSecurity:
    token: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""

    def ssl_context(self) -> ssl.SSLContext | None:
        """The gRPC server's certificate for HTTPS too (and its client CA, when it has one)."""
        if not (self.tls_cert and self.tls_key):
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.tls_cert, self.tls_key)
        if self.tls_ca:
            context.load_verify_locations(self.tls_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context


def _page(name: str) -> web.FileResponse:
    return web.FileResponse(STATIC / name, headers=NO_STORE)


def make_app(client: MonitorClient, security: WebSecurity, host: str) -> web.Application:
    feeds = Feeds(client)
    middlewares: list[Middleware] = [auth.origin_guard(host), api.map_errors]
    if security.token:
        middlewares.insert(1, auth.middleware(security.token))
    app = web.Application(middlewares=middlewares)

    async def index(_request: web.Request) -> web.StreamResponse:
        return _page("index.html")

    async def job_page(_request: web.Request) -> web.StreamResponse:
        return _page("job.html")

    app.add_routes([web.get("/", index), web.get("/jobs/{job_id}", job_page)])
    app.add_routes(api.routes(client, feeds))
    app.add_routes(auth.routes(security.token, secure=bool(security.tls_cert)))
    app.router.add_static("/static/", STATIC, append_version=False)

    async def close_feeds(_app: web.Application) -> None:
        feeds.close()

    app.on_shutdown.append(close_feeds)
    return app


class WebServer:
    """The running web view: ``start`` binds, ``stop`` ends the streams and closes."""

    def __init__(self, runner: web.AppRunner, port: int, scheme: str, host: str) -> None:
        self._runner = runner
        self.port = port
        self.url = f"{scheme}://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}"

    @classmethod
    async def start(
        cls, client: MonitorClient, host: str, port: int, security: WebSecurity
    ) -> WebServer:
        runner = web.AppRunner(
            make_app(client, security, host),
            access_log=None,
            shutdown_timeout=SHUTDOWN_S,
            # A page that leaves ends its stream at once (its shared watch with the last one),
            # not at the next write.
            handler_cancellation=True,
        )
        await runner.setup()
        context = security.ssl_context()
        site = web.TCPSite(runner, host, port, ssl_context=context)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise CannotServeWeb(
                exc.errno,
                f"cannot listen on {host}:{port}: {exc.strerror}; stop whatever "
                "uses it or choose another --http-port (0 turns the web view off)",
            ) from exc
        bound = port
        for sock in getattr(site._server, "sockets", None) or ():
            bound = sock.getsockname()[1]
            break
        return cls(runner, bound, "https" if context else "http", host)

    async def stop(self) -> None:
        await self._runner.cleanup()
