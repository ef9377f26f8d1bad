"""The prompt API: native REST (/v1), MONAI Label, OHIF-AI and AIAA compatibility routes, behind one entry point."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, cast

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount

from config.settings import ConfigError, Settings
from dicom_io.errors import DicomInputError
from dicom_io.store import Store
from models.base import ModelError, PromptError
from node.api.core import ApiContext, ApiError, shorten
from node.inference import (
    InferencePool,
    JobCancelledError,
    ModelUnavailableError,
    QueueFullError,
    UnknownModelError,
)
from node.sessions import SessionExpiredError, SessionNotFoundError, SessionStore, TooManySessionsError

logger = logging.getLogger(__name__)

#: AIAA's status for an expired session (Microsoft's "Login Time-out", used by Clara AIAA).
HTTP_SESSION_EXPIRED = 440


def _error(request: Request, status: int, message: str, field: str | None = None,
           headers: dict[str, str] | None = None) -> Response:
    message = shorten(message)  # a backstop: user input is quoted truncated (core.echo)
    if status >= 500:
        logger.warning("%s %s -> %d: %s", request.method[:20], request.url.path[:200], status, message)
    else:
        logger.info("%s %s -> %d: %s", request.method[:20], request.url.path[:200], status, message)
    # ``error`` for our clients, ``detail`` as FastAPI (MONAI Label) answers.
    return JSONResponse({"error": message, "detail": message, "field": field}, status_code=status, headers=headers)


# One handler per error type (Starlette looks them up along the exception's MRO).


async def _api_error(request: Request, exc: Exception) -> Response:
    e = cast(ApiError, exc)
    return _error(request, e.status, str(e), e.field, e.headers)


async def _busy(request: Request, exc: Exception) -> Response:
    e = cast(QueueFullError | TooManySessionsError, exc)
    return _error(request, 503, str(e), None, {"Retry-After": str(e.retry_after)})


async def _session_expired(request: Request, exc: Exception) -> Response:
    native = request.url.path.startswith("/v1/sessions")
    return _error(request, 410 if native else HTTP_SESSION_EXPIRED, str(exc), "session_id")


async def _session_not_found(request: Request, exc: Exception) -> Response:
    return _error(request, 404, str(exc), "session_id")


async def _unknown_model(request: Request, exc: Exception) -> Response:
    return _error(request, 404, f"model: {exc}", "model")


async def _job_cancelled(request: Request, exc: Exception) -> Response:
    return _error(request, 409, str(exc), "job")


async def _model_unavailable(request: Request, exc: Exception) -> Response:
    return _error(request, 503, str(exc), "model")


async def _http_error(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 400)
    field = "body" if status == 400 else None
    detail = str(getattr(exc, "detail", exc))
    headers = dict(getattr(exc, "headers", None) or {})
    if status == 405:
        # Starlette names the methods of the first route matching the path only; a path served by several
        # routes (GET and DELETE /v1/jobs/{id}) must list them all (RFC 9110 15.5.6).
        headers["Allow"] = ", ".join(_allowed_methods(request)) or headers.get("Allow", "")
    return _error(request, status, f"body: {detail}" if field else detail, field, headers)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route of the API serves at the request's path."""
    from starlette.routing import Match

    app = request.scope.get("app")
    methods: set[str] = set()
    scope = {**request.scope, "method": "\x00"}  # matches no route fully: each matching path answers PARTIAL
    for route in getattr(app, "routes", ()):
        match, _ = route.matches(scope)
        if match is not Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    order = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    return sorted(methods, key=lambda m: (order.index(m) if m in order else len(order), m))


async def _prompt_error(request: Request, exc: Exception) -> Response:
    return _error(request, 422, f"prompts: {exc}", "prompts")


async def _dicom_error(request: Request, exc: Exception) -> Response:
    return _error(request, 422, f"image: {exc}", "image")


async def _model_error(request: Request, exc: Exception) -> Response:
    return _error(request, 503, f"model: {exc}", "model")


async def _memory_error(request: Request, exc: Exception) -> Response:
    # Outside a model job (reading a large series, writing outputs); jobs raise ModelOutOfMemoryError.
    return _error(request, 503, "The node ran out of memory on this request (e.g. reading a very large series); "
                                "it goes on serving; retry later or with a smaller series.", None)


#: The API's answer to each error type: ``{"error", "detail", "field"}`` JSON with the status shown.
EXCEPTION_HANDLERS: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
    ApiError: _api_error,  # its own status, field and headers
    QueueFullError: _busy, TooManySessionsError: _busy,  # 503 + Retry-After
    SessionExpiredError: _session_expired,  # 410 (native) / 440 (MONAI Label, AIAA)
    SessionNotFoundError: _session_not_found,  # 404
    UnknownModelError: _unknown_model,  # 404
    JobCancelledError: _job_cancelled,  # 409
    ModelUnavailableError: _model_unavailable,  # 503 (ModelOutOfMemoryError too)
    PromptError: _prompt_error,  # 422
    DicomInputError: _dicom_error,  # 422
    ModelError: _model_error,  # 503
    MemoryError: _memory_error,  # 503
    # Starlette's own refusals (malformed multipart/form data, 404/405) as JSON errors too.
    HTTPException: _http_error,
}


def api_routes(settings: Settings, store: Store, inference: InferencePool | None = None,
               sessions: SessionStore | None = None, *, outbox: Any | None = None,
               context: ApiContext | None = None) -> list[BaseRoute]:
    """The REST API as routes for :func:`node.app.create_app` (``routes=api_routes(...)``).

    All API routes live in one mounted sub-application with its own exception handlers
    (:data:`EXCEPTION_HANDLERS`), so every refused request is a 4xx JSON answer naming the field
    (``{"error", "detail", "field"}``); a full queue is 503 with ``Retry-After``. The bearer tokens
    (``api.tokens``) are checked once, by the ``AuthMiddleware`` of :func:`node.app.create_app`.

    Parameters
    ----------
    settings
        Node settings.
    store
        The node's store (shared with DIMSE and DICOMweb).
    inference
        Inference queues (default: a new :class:`InferencePool` over ``settings``).
    sessions
        Session store (default: from ``settings.api``).
    outbox
        The node's :class:`~node.outbox.Outbox`; results for DIMSE destinations are queued there.
    context
        A pre-built context (tests); overrides the other arguments.

    Returns
    -------
    list
        One ``Mount("")`` holding ``/v1/...``, ``/metrics``, ``/openapi.json``, MONAI Label (``/info/``,
        ``/infer/{model}``, ``/session/``...) and AIAA (``/v1/models``, ``/v1/segmentation``...) routes.
        Routes given to ``create_app`` before it (``/health``, ``/dicomweb``) keep precedence.

    """
    from node.api.aiaa import AiaaApi
    from node.api.monailabel import MonaiLabelApi
    from node.api.native import NativeApi
    from node.api.openapi import openapi_route

    ctx = context or build_context(settings, store, inference, sessions, outbox=outbox)
    native = NativeApi(ctx)
    monai = MonaiLabelApi(ctx)
    aiaa = AiaaApi(ctx, monai)
    from node.api.admin import AdminApi

    routes: list[BaseRoute] = [*native.routes(), *aiaa.routes(), *monai.routes(), *AdminApi(ctx).routes()]
    routes.append(openapi_route(routes))
    root = monailabel_root_path(settings.api.monailabel_root_path, routes)
    if root:
        # MONAI Label behind a proxy that keeps the prefix (OHIF-AI's nginx: location /monai/ -> root_path=/monai).
        routes.insert(0, Mount(root, routes=monai.routes()))
    # Authentication and roles: the one AuthMiddleware node.app.create_app puts around every route.
    app = Starlette(routes=routes, exception_handlers=EXCEPTION_HANDLERS)
    app.state.api = ctx
    return [Mount("", app=app, name="api")]


def monailabel_root_path(value: str, routes: list[BaseRoute] | None = None) -> str:
    """``api.monailabel_root_path`` checked: ``""`` or ``/segment[/segment...]`` that no other route starts with.

    Raises
    ------
    ConfigError
        When the value is not such a path, or its first segment is one of the node's own routes
        (``/dicomweb``, ``/v1``, ``/ohif``...).
    """
    text = value.strip()
    if not text:
        return ""
    if not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", text.rstrip("/")) or text.rstrip("/") in ("/.", "/.."):
        raise ConfigError(f"api.monailabel_root_path {value[:200]!r} is not a URL path such as '/monai'.")
    text = text.rstrip("/")
    first = text.split("/")[1]
    taken = {"dicomweb", "ohif", "ohif-archive", "prompt", "health"}
    for route in routes or ():
        path = getattr(route, "path", "")
        if path.startswith("/") and len(path) > 1:
            taken.add(path.split("/")[1])
    if first in taken:
        raise ConfigError(f"api.monailabel_root_path {text!r} starts with /{first}, which the node already "
                          "serves; choose another prefix such as '/monai'.")
    return text


def build_context(settings: Settings, store: Store, inference: InferencePool | None = None,
                  sessions: SessionStore | None = None, *, outbox: Any | None = None) -> ApiContext:
    """The shared state of the API handlers."""
    a = settings.api
    return ApiContext(
        settings, store,
        inference or InferencePool(settings),
        sessions or SessionStore(a.session_ttl_seconds, a.max_sessions, a.retry_after_seconds),
        outbox=outbox,
    )


__all__ = ["EXCEPTION_HANDLERS", "HTTP_SESSION_EXPIRED", "api_routes", "build_context", "monailabel_root_path"]



