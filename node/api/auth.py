"""Bearer-token authentication for the REST API (tokens from ``api.tokens``; off when none are configured)."""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from config.settings import Secret

logger = logging.getLogger(__name__)

#: Paths answered without a token (the API description; CORS preflights are never authenticated).
PUBLIC_PATHS = frozenset({"/openapi.json"})


def parse_tokens(tokens: Sequence[Secret]) -> list[tuple[str, bytes]]:
    """``USER:TOKEN`` secrets → (user, token bytes).

    Raises
    ------
    ValueError
        When an entry is not of the form ``USER:TOKEN`` (the message never contains the token).
    """
    out: list[tuple[str, bytes]] = []
    for n, secret in enumerate(tokens):
        user, sep, token = secret.get_secret_value().partition(":")
        if not sep or not user.strip() or not token:
            raise ValueError(f"api.tokens[{n}] is not of the form USER:TOKEN.")
        out.append((user.strip(), token.encode()))
    return out


class BearerAuthMiddleware:
    """Require ``Authorization: Bearer <token>``; sets ``scope["ainode.user"]`` to the token's user.

    With no tokens configured every request passes as user ``anonymous``.
    """

    def __init__(self, app: ASGIApp, tokens: Sequence[Secret] = ()) -> None:
        self.app = app
        self.tokens = parse_tokens(tokens)

    def _user(self, header: str) -> str | None:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            return None
        given = value.strip().encode()
        found = None
        for user, token in self.tokens:
            if hmac.compare_digest(given, token):
                found = user
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self.tokens or scope["method"] == "OPTIONS" or scope["path"] in PUBLIC_PATHS:
            scope["ainode.user"] = "anonymous"
            await self.app(scope, receive, send)
            return
        header = ""
        for key, value in scope.get("headers", []):
            if key == b"authorization":
                header = value.decode("latin-1")
        user = self._user(header) if header else None
        if user is None:
            message = ("Authorization: a bearer token is required (Authorization: Bearer <token>)." if not header
                       else "Authorization: the bearer token is not valid.")
            logger.warning("Refused %s %s: %s", scope["method"], scope["path"], "no token" if not header else
                           "invalid token")
            body = json.dumps({"error": message, "detail": message, "field": "Authorization"}).encode()
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode()),
                                    (b"www-authenticate", b'Bearer realm="ainode"')]})
            await send({"type": "http.response.body", "body": body})
            return
        scope["ainode.user"] = user
        await self.app(scope, receive, send)
