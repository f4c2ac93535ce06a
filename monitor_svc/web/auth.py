"""The bearer token in a browser: with ``--auth-token`` every page and API route needs it,
from an ``Authorization: Bearer`` header (scripts, as gRPC calls send it) or from the cookie
the login form sets (HttpOnly, so no script on the page can read it; SameSite=Strict, so no
other site can make the browser send it). ``/healthz``, the login form and the static files
(which hold no data) are open."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from html import escape
from urllib.parse import quote

from aiohttp import web
from aiohttp.typedefs import Middleware

COOKIE = "stepflow_token"
OPEN_PATHS = ("/healthz", "/login")
OPEN_PREFIXES = ("/static/",)
COOKIE_MAX_AGE_S = 30 * 24 * 3600

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _presented(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value:
        return value.strip()
    return request.cookies.get(COOKIE, "")


def token_matches(expected: str, presented: str) -> bool:
    return hmac.compare_digest(expected.encode(), presented.encode())


def middleware(token: str) -> Middleware:
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return await handler(request)
        if token_matches(token, _presented(request)):
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


def _safe_next(target: str) -> str:
    """Only a path on this site (never ``//elsewhere`` or a full address)."""
    return target if target.startswith("/") and not target.startswith("//") else "/"


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
        if not token or not token_matches(token, presented):
            return login_page(target, "That token is not the monitor's.", status=401)
        response = web.HTTPSeeOther(target)
        response.set_cookie(
            COOKIE,
            presented,
            max_age=COOKIE_MAX_AGE_S,
            httponly=True,
            samesite="Strict",
            secure=secure,
            path="/",
        )
        raise response

    return [web.get("/login", show), web.post("/login", submit)]
