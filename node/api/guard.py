"""Request guard around the whole HTTP application: body size limit and path tricks (docs/security.md).

* A ``Content-Length`` above the limit is answered 413 before a byte of the body is read; a body
  without one (chunked transfer encoding) is counted as it streams and answered 413 the moment it
  passes the limit (the handler's own answer, if any, is replaced). STOW-RS (``POST /dicomweb/…``)
  is exempt: a PACS forwards whole studies, which are streamed part by part into the store and
  bounded by the store's free-space floor (``store.min_free_gb``: 507 when reached).
* A path with a ``.`` or ``..`` segment, a backslash, a NUL or other control character, or a
  percent-encoded ``/``, ``\\``, ``.`` or NUL is answered 400: path parameters (UIDs, ids) never need
  them, and a handler that joins a parameter into a file path can then not be led out of its folder.
"""

from __future__ import annotations

import json
import logging
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

_ENCODED = re.compile(rb"%(2f|5c|2e|00)", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")


class BodyTooLargeError(Exception):
    """The streamed request body passed the limit (raised from ``receive``)."""


def path_problem(path: str, raw_path: bytes | None) -> str | None:
    """Why a request path is refused, or None when it is fine."""
    if raw_path is not None and _ENCODED.search(raw_path.split(b"?", 1)[0]):
        return "percent-encoded '/', '\\', '.' or NUL are not accepted in the path."
    if _CONTROL.search(path):
        return "control characters and backslashes are not accepted in the path."
    if any(seg in (".", "..") for seg in path.split("/")):
        return "'.' and '..' segments are not accepted in the path."
    return None


def _json(status: int, message: str, field: str) -> tuple[Message, Message]:
    body = json.dumps({"error": message, "detail": message, "field": field}).encode()
    return ({"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         (b"connection", b"close")]},
            {"type": "http.response.body", "body": body})


class RequestGuardMiddleware:
    """Refuse oversized bodies (413) and path tricks (400) before the application sees them.

    Parameters
    ----------
    app
        The wrapped application.
    max_body_bytes
        Largest request body in bytes (``api.max_upload_bytes``); 0 = no limit.
    exempt
        (method, path prefix) pairs the limit does not apply to (STOW-RS).
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int = 0,
                 exempt: tuple[tuple[str, str], ...] = (("POST", "/dicomweb/"),)) -> None:
        self.app = app
        self.max_body_bytes = int(max_body_bytes)
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope.get("method", ""), scope.get("path", "")
        shown = path[:200]  # user input in a log line is quoted truncated (docs/security.md)
        problem = path_problem(path, scope.get("raw_path"))
        if problem:
            logger.warning("Refused %s request: %s", method[:20], problem)
            for message in _json(400, f"path: {problem}", "path"):
                await send(message)
            return
        limit = self.max_body_bytes
        if not limit or any(method == m and path.startswith(prefix) for m, prefix in self.exempt):
            await self.app(scope, receive, send)
            return
        length = None
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                length = value
        if length is not None:
            text = length.decode("latin-1").strip()
            if not (text.isascii() and text.isdigit()):  # int() would read other scripts' digits too
                for message in _json(400, f"body: Content-Length '{text[:40]}' is not a byte count.", "body"):
                    await send(message)
                return
            if int(text) > limit:
                logger.warning("Refused %s %s: Content-Length %s > %d", method[:20], shown, text[:40], limit)
                for message in _json(413, f"body: {text} bytes exceed api.max_upload_bytes ({limit}).", "body"):
                    await send(message)
                return
        state = {"received": 0, "exceeded": False, "started": False, "refused": False}

        async def counted_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > limit:
                    state["exceeded"] = True
                    raise BodyTooLargeError(f"more than {limit} bytes")
            return message

        async def guarded_send(message: Message) -> None:
            if state["exceeded"]:
                if not state["started"]:
                    await refuse()
                return  # the handler's own answer to the cut-off body is dropped
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        async def refuse() -> None:
            if state["refused"]:
                return
            state["refused"] = True
            logger.warning("Refused %s %s: streamed body passed %d bytes", method[:20], shown, limit)
            for m in _json(413, f"body: more than api.max_upload_bytes ({limit}) bytes were sent.", "body"):
                await send(m)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except BodyTooLargeError:
            pass
        except Exception:
            if not state["exceeded"]:
                raise
        if state["exceeded"] and not state["started"]:
            await refuse()


__all__ = ["BodyTooLargeError", "RequestGuardMiddleware", "path_problem"]
