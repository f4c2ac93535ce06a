"""The web view inside a monitor process: a private gRPC socket for it (a Unix socket in a
directory only this user can enter, so it needs no TLS), a ``MonitorClient`` on that socket
with the monitor's token, and the HTTP server. Stopped before gRPC, so open pages see the
stream end and reconnect to whichever monitor serves next."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from grpc import aio

from monitor_svc.web.server import WebSecurity, WebServer
from stepflow_client.aio import MonitorClient
from stepflow_common import serving

CALL_TIMEOUT_S = 30.0


@dataclass(slots=True)
class Loopback:
    directory: Path

    @property
    def target(self) -> str:
        return f"unix:{self.directory / 'monitor.sock'}"


@dataclass(slots=True)
class WebView:
    server: WebServer
    client: MonitorClient
    loopback: Loopback

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def port(self) -> int:
        return self.server.port

    @staticmethod
    def bind_loopback(server: aio.Server) -> Loopback:
        """Bind the private socket (before the gRPC server starts)."""
        found = Loopback(Path(tempfile.mkdtemp(prefix="stepflow-web-")))
        server.add_insecure_port(found.target)
        return found

    @classmethod
    async def start(
        cls, loopback: Loopback, host: str, port: int, security: serving.Security
    ) -> WebView:
        client = MonitorClient(loopback.target, token=security.auth_token, timeout=CALL_TIMEOUT_S)
        web_security = WebSecurity(
            token=security.auth_token,
            tls_cert=security.tls_cert,
            tls_key=security.tls_key,
            tls_ca=security.tls_ca,
        )
        try:
            server = await WebServer.start(client, host, port, web_security)
        except BaseException:
            await client.close()
            shutil.rmtree(loopback.directory, ignore_errors=True)
            raise
        return cls(server, client, loopback)

    async def stop(self) -> None:
        await self.server.stop()
        await self.client.close()
        shutil.rmtree(self.loopback.directory, ignore_errors=True)
