"""Each error type's HTTP answer (node/api/__init__.py EXCEPTION_HANDLERS), and authentication applied once."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.routing import Route
from starlette.testclient import TestClient

from api_helpers import Api
from config.settings import ConfigError
from dicom_io.errors import NotDicomError
from models.base import ModelError, PromptError
from node.api import EXCEPTION_HANDLERS
from node.api.auth import AuthMiddleware
from node.api.core import ApiError
from node.inference import (
    JobCancelledError,
    ModelOutOfMemoryError,
    ModelUnavailableError,
    QueueFullError,
    UnknownModelError,
)
from node.sessions import SessionExpiredError, SessionNotFoundError, TooManySessionsError

#: (error raised by a route, path, status, body, headers the answer must carry): what the API answered
#: before the per-type handlers replaced one isinstance ladder.
CASES: list[tuple[Exception, str, int, dict[str, Any], dict[str, str]]] = [
    (ApiError(418, "teapot: short and stout", "teapot", {"X-Why": "test"}), "/v1/x", 418,
     {"error": "teapot: short and stout", "detail": "teapot: short and stout", "field": "teapot"}, {"X-Why": "test"}),
    (QueueFullError("queue full", retry_after=7), "/v1/x", 503,
     {"error": "queue full", "detail": "queue full", "field": None}, {"Retry-After": "7"}),
    (TooManySessionsError("too many", retry_after=3), "/v1/x", 503,
     {"error": "too many", "detail": "too many", "field": None}, {"Retry-After": "3"}),
    (SessionExpiredError("gone"), "/v1/sessions/1", 410,
     {"error": "gone", "detail": "gone", "field": "session_id"}, {}),
    (SessionExpiredError("gone"), "/session/1", 440, {"error": "gone", "detail": "gone", "field": "session_id"}, {}),
    (SessionNotFoundError("no such session"), "/v1/x", 404,
     {"error": "no such session", "detail": "no such session", "field": "session_id"}, {}),
    (UnknownModelError("'x' is unknown"), "/v1/x", 404,
     {"error": "model: 'x' is unknown", "detail": "model: 'x' is unknown", "field": "model"}, {}),
    (JobCancelledError("cancelled"), "/v1/x", 409, {"error": "cancelled", "detail": "cancelled", "field": "job"}, {}),
    (ModelUnavailableError("cannot load"), "/v1/x", 503,
     {"error": "cannot load", "detail": "cannot load", "field": "model"}, {}),
    (ModelOutOfMemoryError("out of memory"), "/v1/x", 503,
     {"error": "out of memory", "detail": "out of memory", "field": "model"}, {}),
    (PromptError("box is empty"), "/v1/x", 422,
     {"error": "prompts: box is empty", "detail": "prompts: box is empty", "field": "prompts"}, {}),
    (NotDicomError("x.bin: not DICOM"), "/v1/x", 422,
     {"error": "image: x.bin: not DICOM", "detail": "image: x.bin: not DICOM", "field": "image"}, {}),
    (ModelError("weights missing"), "/v1/x", 503,
     {"error": "model: weights missing", "detail": "model: weights missing", "field": "model"}, {}),
    (HTTPException(400, "bad form"), "/v1/x", 400,
     {"error": "body: bad form", "detail": "body: bad form", "field": "body"}, {}),
]


@pytest.mark.parametrize(("exc", "path", "status", "body", "headers"), CASES,
                         ids=[f"{type(c[0]).__name__}-{c[1]}" for c in CASES])
def test_each_error_type_has_its_answer(exc: Exception, path: str, status: int, body: dict[str, Any],
                                        headers: dict[str, str]) -> None:
    async def fail(request: Request) -> None:
        raise exc

    app = Starlette(routes=[Route(path, fail)], exception_handlers=EXCEPTION_HANDLERS)
    with TestClient(app) as client:
        r = client.get(path)
    assert r.status_code == status, r.text
    assert r.json() == body
    for name, value in headers.items():
        assert r.headers[name] == value


def test_a_config_error_at_request_time_is_a_400(api: Api) -> None:
    """A ConfigError raised while serving (e.g. an unknown destination) answers 400, as NodeErrors do."""
    async def fail(request: Request) -> None:
        raise ConfigError("Destination 'X' is not configured (known: none configured).")

    api.app.router.routes.insert(0, Route("/config-error", fail))
    r = api.client.get("/config-error")
    assert r.status_code == 400
    assert r.json() == {"error": "Destination 'X' is not configured (known: none configured).", "type": "ConfigError"}


def _auth_middlewares(app: Any) -> int:
    """AuthMiddleware instances in an app's declared middleware and in its mounted sub-applications."""
    count = sum(1 for m in getattr(app, "user_middleware", ()) if isinstance(m, Middleware) and m.cls is AuthMiddleware)
    for route in getattr(app, "routes", ()):
        sub = getattr(route, "app", None)
        if sub is not None and sub is not app:
            count += _auth_middlewares(sub)
    return count


def test_authentication_is_applied_once(api: Api) -> None:
    assert _auth_middlewares(api.app) == 1
