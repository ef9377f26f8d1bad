"""Errors the API answers, and how user input is quoted in them (docs/security.md)."""

from __future__ import annotations

import reprlib
from collections.abc import Mapping
from typing import Any

from node.errors import NodeError

#: Characters of user input quoted in an error message or a log line; a longer value is cut (docs/security.md).
ECHO_CHARS = 200
#: Longest error message answered or logged; a longer one keeps its start and end (the limit it names).
MESSAGE_CHARS = 1000

_ECHO = reprlib.Repr()
_ECHO.maxstring = ECHO_CHARS
_ECHO.maxother = ECHO_CHARS
_ECHO.maxlist = _ECHO.maxtuple = _ECHO.maxdict = _ECHO.maxset = 8
_ECHO.maxlevel = 3
_ECHO.maxlong = 60


def echo(value: Any) -> str:
    """``repr(value)`` for an error message or a log line, at most about :data:`ECHO_CHARS` characters.

    A long string says how long it was; containers show their first items only, nested ones a few
    levels deep. So a 100 MB "UID" costs a 200-character message, not a 100 MB log line.
    """
    if isinstance(value, str) and len(value) > ECHO_CHARS:
        return f"{value[:ECHO_CHARS]!r}... ({len(value)} characters)"
    text = _ECHO.repr(value)
    return text if len(text) <= ECHO_CHARS + 20 else text[:ECHO_CHARS] + "..."


def shorten(message: str, limit: int = MESSAGE_CHARS) -> str:
    """``message`` cut to about ``limit`` characters, keeping its start and its end."""
    if len(message) <= limit:
        return message
    tail = limit // 4
    return f"{message[:limit - tail]} ... [{len(message) - limit} characters cut] ... {message[-tail:]}"


class ApiError(NodeError):
    """A request the API refuses: HTTP ``status``, the offending ``field`` and a message naming the problem.

    The message is cut to :data:`MESSAGE_CHARS` (a backstop: handlers quote user input with :func:`echo`).
    """

    def __init__(self, status: int, message: str, field: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(shorten(message))
        self.status = status
        self.field = field
        self.headers = dict(headers or {})


def bad(field: str, message: str, status: int = 422) -> ApiError:
    """A validation error about ``field`` (its name is put in front of the message)."""
    return ApiError(status, f"{field}: {message}", field)


__all__ = ["ECHO_CHARS", "MESSAGE_CHARS", "ApiError", "bad", "echo", "shorten"]
