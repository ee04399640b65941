"""Who may see the dashboard and who may act through it: the auth hook, the read-only switch
and the CSRF check of every action.

CSRF is a double-submit token: every page sets a random token in a cookie (``SameSite=Strict``,
``HttpOnly``) and puts the same token in each action's form; an action is done only when the
form's token equals the cookie's. Another site can make a browser post a form here, but can
neither read nor set this site's cookie, so it cannot send the matching token.
"""

from __future__ import annotations

import hmac
import inspect
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

CSRF_COOKIE = "iterflow_csrf"
CSRF_FIELD = "csrf"

AuthResult = bool | Response
Auth = Callable[[Request], AuthResult | Awaitable[AuthResult]]


async def admit(auth: Auth | None, request: Request) -> Response | None:
    """None when ``auth`` lets the request in; else the response to send (the hook's own, e.g.
    a redirect to a login page, or 403)."""
    if auth is None:
        return None
    verdict = auth(request)
    if inspect.isawaitable(verdict):
        verdict = await verdict
    if isinstance(verdict, Response):
        return verdict
    return None if verdict is True else forbidden("not allowed (the dashboard's auth hook said no)")


def token_of(request: Request) -> tuple[str, bool]:
    """The request's CSRF token, and whether it is new (then the response must set the cookie)."""
    known = request.cookies.get(CSRF_COOKIE)
    if known and len(known) == 43:
        return known, False
    return secrets.token_urlsafe(32), True


def set_token(response: Response, request: Request, token: str) -> None:
    path = request.scope.get("root_path") or "/"
    response.set_cookie(CSRF_COOKIE, token, httponly=True, samesite="strict", path=path,
                        secure=request.url.scheme == "https")


def check_token(request: Request, form: Mapping[str, Any]) -> Response | None:
    """None when the form carries the cookie's token; else 403."""
    cookie = request.cookies.get(CSRF_COOKIE, "")
    sent = form.get(CSRF_FIELD, "")
    if not cookie or not isinstance(sent, str) or not hmac.compare_digest(cookie.encode(), sent.encode()):
        return forbidden("CSRF token missing or wrong: reload the page and try again")
    return None


def forbidden(message: str) -> Response:
    return PlainTextResponse(message, status_code=403)
