"""Who may use the web view. With ``--auth-token`` every page and API route needs it, from an
``Authorization: Bearer`` header (scripts, as gRPC calls send it) or from the session cookie
the login form sets: a value derived from the token, not the token (cookies ignore ports, so
another service on the host may see it; it opens this web view and nothing else), named
after the port (monitors side by side keep their own), HttpOnly (no script reads it) and
SameSite=Strict. ``/healthz``, the login form and the static files (no data) are open.

Whatever the token: a request that changes something (a POST) from a page of another origin
is refused, and a web view listening on loopback answers only to a loopback Host (a
DNS-rebinding page cannot read it)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable
from html import escape
from urllib.parse import quote, urlsplit

from aiohttp import web
from aiohttp.typedefs import Middleware

COOKIE_PREFIX = "stepflow_session_"
SESSION_CONTEXT = b"stepflow web session"
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
OPEN_PATHS = ("/healthz", "/login")
OPEN_PREFIXES = ("/static/",)
COOKIE_MAX_AGE_S = 30 * 24 * 3600

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def session_value(token: str) -> str:
    """What the login cookie holds: derived from the token, useless as a gRPC token."""
    return hmac.new(token.encode(), SESSION_CONTEXT, hashlib.sha256).hexdigest()


def cookie_name(request: web.Request) -> str:
    return f"{COOKIE_PREFIX}{request.url.port or 0}"


def _same(expected: str, presented: str) -> bool:
    return hmac.compare_digest(expected.encode(), presented.encode())


def signed_in(request: web.Request, token: str) -> bool:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value:
        return _same(token, value.strip())
    return _same(session_value(token), request.cookies.get(cookie_name(request), ""))


def middleware(token: str) -> Middleware:
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return await handler(request)
        if signed_in(request, token):
            return await handler(request)
        if path.startswith("/api/"):
            return web.json_response(
                {
                    "error": "missing or wrong bearer token (Authorization: Bearer <token>)",
                    "code": "unauthenticated",
                },
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="stepflow"'},
            )
        raise web.HTTPSeeOther(f"/login?next={quote(request.path_qs, safe='')}")

    return check


def origin_guard(listen_host: str) -> Middleware:
    """Refuse a cross-origin POST (a page elsewhere cancelling jobs), and, on a loopback
    listener, a Host that is not loopback (DNS rebinding)."""
    loopback_only = listen_host in LOOPBACK_NAMES or listen_host.startswith("127.")

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        host = request.url.host or ""
        if loopback_only and host not in LOOPBACK_NAMES and not host.startswith("127."):
            return web.json_response(
                {"error": f"this web view answers on loopback only, not {host!r}",
                 "code": "misdirected"},
                status=421,
            )  # fmt: skip
        origin = request.headers.get("Origin")
        cross_origin = origin is not None and (
            origin == "null" or urlsplit(origin).netloc != request.host
        )
        if request.method not in SAFE_METHODS and cross_origin:
            return web.json_response(
                {"error": f"a request from {origin} may not change anything here",
                 "code": "forbidden"},
                status=403,
            )  # fmt: skip
        return await handler(request)

    return guard


def _safe_next(target: str) -> str:
    """Only a path on this site: never ``//elsewhere``, ``/\\elsewhere`` or a full address,
    nor anything with a control character or a space (browsers drop tabs and newlines, which
    would turn ``/\t/elsewhere`` into ``//elsewhere``)."""
    if not target.startswith("/") or target.startswith(("//", "/\\")):
        return "/"
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 or c == "\\" for c in target):
        return "/"
    return target


LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>stepflow · sign in</title><link rel="icon" href="data:,">
<link rel="stylesheet" href="/static/stepflow.css">
</head><body class="login"><main>
<h1>stepflow</h1>
<form method="post" action="/login" data-login>
<input type="hidden" name="next" value="{next}">
<label for="token">Token</label>
<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
<button type="submit">Sign in</button>
{message}
</form>
<p class="hint">The monitor's <code>--auth-token</code>. It is kept in a cookie for this site.</p>
</main></body></html>
"""


def login_page(next_path: str, message: str = "", status: int = 200) -> web.Response:
    note = (
        f'<p class="error" role="alert" data-login-error>{escape(message)}</p>' if message else ""
    )
    body = LOGIN_PAGE.format(next=escape(_safe_next(next_path)), message=note)
    return web.Response(text=body, content_type="text/html", status=status)


def routes(token: str, secure: bool) -> list[web.RouteDef]:
    async def show(request: web.Request) -> web.StreamResponse:
        return login_page(request.query.get("next", "/"))

    async def submit(request: web.Request) -> web.StreamResponse:
        form = await request.post()
        presented = str(form.get("token", ""))
        target = _safe_next(str(form.get("next", "/")))
        if not token or not _same(token, presented):
            return login_page(target, "That token is not the monitor's.", status=401)
        response = web.HTTPSeeOther(target)
        response.set_cookie(
            cookie_name(request),
            session_value(token),
            max_age=COOKIE_MAX_AGE_S,
            httponly=True,
            samesite="Strict",
            secure=secure,
            path="/",
        )
        raise response

    return [web.get("/login", show), web.post("/login", submit)]
