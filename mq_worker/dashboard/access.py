"""Who may use the dashboard, and protection of its actions against cross-site requests.

With `--auth-file`, every request needs the file's secret: as a bearer token
(`Authorization: Bearer SECRET`, for scripts) or as the password of HTTP basic
authentication with any user name (for browsers, which ask for it). Without
it the dashboard serves only on a loopback address.

Every action is a POST carrying the CSRF token that the dashboard's pages
embed, in the form field `csrf_token` or the header `X-CSRF-Token`; a page of
another site cannot read the token, so it cannot make a browser act. A POST
whose `Origin` is another site is refused as well.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from mq_worker.errors import ConfigurationError

CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_secret(path: Path) -> str:
    """The secret of an auth file: its first non-empty line, at least 16 characters."""
    try:
        lines = [line.strip() for line in path.read_text().splitlines()]
    except OSError as exc:
        raise ConfigurationError(f"cannot read the auth file {path}: {exc.strerror}") from None
    secret = next((line for line in lines if line and not line.startswith("#")), "")
    if len(secret) < 16:
        raise ConfigurationError(f"the auth file {path} must hold a secret of 16 characters "
                                 "or more on its first line")
    return secret


class Access:
    """Authentication (when configured) and CSRF tokens for one dashboard process."""

    def __init__(self, secret: str | None) -> None:
        self.secret = secret
        self.csrf_token = secrets.token_urlsafe(32)

    @classmethod
    def for_host(cls, host: str, auth_file: Path | None) -> Access:
        if auth_file is None and not is_loopback(host):
            raise ConfigurationError(
                f"the dashboard serves on {host} only with --auth-file: anyone who reaches it "
                "could cancel and replay runs")
        return cls(read_secret(auth_file) if auth_file else None)

    def authenticated(self, request: web.Request) -> str | None:
        """The name of who is asking ("local" without authentication), or None if refused."""
        secret = self.secret
        if secret is None:
            return "local"
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(),
                                                              secret.encode()):
            return "token"
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(value.strip()).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return None
            if hmac.compare_digest(password.encode(), secret.encode()):
                return user or "basic"
        return None

    def csrf_ok(self, request: web.Request, form_token: str | None) -> bool:
        origin = request.headers.get("Origin")
        if origin and origin != "null" and origin.split("://", 1)[-1] != request.host:
            return False
        token = form_token or request.headers.get(CSRF_HEADER) or ""
        return hmac.compare_digest(token.encode(), self.csrf_token.encode())

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        who = self.authenticated(request)
        if who is None:
            raise web.HTTPUnauthorized(
                text="authentication required",
                headers={"WWW-Authenticate": 'Basic realm="mq-worker dashboard"'})
        request["actor"] = who
        response = await handler(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
            "frame-ancestors 'none'")
        return response
