"""The node's HTTP application (Starlette): DICOMweb under /dicomweb; served by uvicorn in ``ainode serve``."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from anyio import open_file as _open_file  # noqa: F401 - see below
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from config.settings import ConfigError, Settings
from dicom_io.store import Store
from node.dicomweb import DicomwebConfig, dicomweb_routes
from node.errors import NodeError
from node.prompt_page import prompt_page_routes
from node.scp import StoredInstance
from node.viewer import ohif_ai_routes, viewer_routes

# anyio imports its file I/O lazily, at the first FileResponse, on the server's thread while other threads
# may be importing too. Importing it here, with the app, keeps imports off the request path. Under pytest
# (which rewrites anyio's modules, a plugin's) that lazy import raced other threads in CPython
# 3.11's parser ("SystemError: AST constructor recursion depth mismatch") and broke a file response.

logger = logging.getLogger(__name__)


async def _node_error(request: Request, exc: Exception) -> Response:
    logger.warning("%s %s: %s", request.method, request.url.path, exc)
    return JSONResponse({"error": str(exc), "type": type(exc).__name__}, status_code=400)


async def _health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def create_app(
    settings: Settings,
    store: Store,
    *,
    on_stored: Sequence[Callable[[StoredInstance], None]] = (),
    routes: Sequence[BaseRoute] = (),
) -> Starlette:
    """The node's Starlette application.

    Parameters
    ----------
    settings
        Node settings (``settings.http``).
    store
        The durable store the DICOMweb routes read and STOW-RS writes.
    on_stored
        Called for every instance received by STOW-RS (as the DIMSE listener's listeners are).
    routes
        Further routes (the REST API of a later issue).

    Returns
    -------
    Starlette
        DICOMweb (PS3.18) under ``/dicomweb``: STOW-RS, QIDO-RS, WADO-RS (behind the bearer tokens of
        ``api.tokens`` when any are configured); ``/health``.
    """
    cfg = DicomwebConfig(store=store, on_stored=on_stored)  # kept by reference: listeners added later count
    middleware = []
    if settings.http.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(settings.http.cors_origins),
                                     allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"],
                                     expose_headers=["Content-Type", "Warning"]))
    dicomweb: Any = Starlette(routes=dicomweb_routes(cfg))
    own: list[BaseRoute] = [Route("/health", _health), Mount("/dicomweb", app=dicomweb), *prompt_page_routes(),
                            *viewer_routes(settings), *routes]
    # The OHIF-AI viewer (viewer.ohif_ai_dist) at the site root: it answers only paths no other route owns.
    reserved = _first_segments(own)
    site = ohif_ai_routes(settings, reserved)
    # Every route (API, DICOMweb, pages) behind the bearer tokens and roles of api.tokens (node/api/auth.py),
    # then the request guard: body size limit and path tricks (node/api/guard.py); docs/security.md.
    from node.api import monailabel_root_path
    from node.api.auth import AuthMiddleware, parse_tokens, route_roles
    from node.api.guard import RequestGuardMiddleware

    tokens = getattr(getattr(settings, "api", None), "tokens", ())
    try:
        parse_tokens(tokens)  # a malformed entry stops start-up (the middleware is built at the first request)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    rules = route_roles(monailabel_root_path(settings.api.monailabel_root_path), reserved if site else None)
    middleware.append(Middleware(AuthMiddleware, tokens=tokens, rules=rules))
    middleware.append(Middleware(RequestGuardMiddleware, max_body_bytes=settings.api.max_upload_bytes))
    return Starlette(
        # The prompt page (GET /, /prompt/...) precedes the API's catch-all mount; the OHIF-AI viewer, when
        # served, precedes both (it leaves the node's own paths alone).
        routes=[*own[:2], *site, *own[2:]],
        middleware=middleware,
        # ConfigError: settings the request needs are wrong (e.g. a destination), as for NodeError.
        exception_handlers={NodeError: _node_error, ConfigError: _node_error},
    )


def _first_segments(routes: Sequence[BaseRoute]) -> frozenset[str]:
    """First path segments of a route tree (``dicomweb``, ``v1``, ``info``...), through ``Mount("")``."""
    out: set[str] = set()
    for route in routes:
        path = getattr(route, "path", "")
        if isinstance(route, Mount) and not path:
            out |= _first_segments(route.routes)
            continue
        first = path.split("/")[1] if path.startswith("/") and len(path) > 1 else ""
        if first and not first.startswith("{"):
            out.add(first)
    return frozenset(out)


class HttpServer:
    """uvicorn serving an ASGI app from a background thread (started and stopped by the node service).

    Parameters
    ----------
    app
        The ASGI application.
    host, port
        Address to bind (port 0 picks a free one; see :attr:`port` after :meth:`start`).
    tls_cert, tls_key, tls_ca
        HTTPS (``[http] tls_*``): PEM certificate and key; with ``tls_ca`` clients must present a
        certificate signed by it. With a certificate the port serves HTTPS only.

    Raises
    ------
    config.settings.ConfigError
        When a TLS file is missing or unreadable.
    """

    def __init__(self, app: Any, host: str, port: int, *, tls_cert: str = "", tls_key: str = "",
                 tls_ca: str = "") -> None:
        import ssl

        import uvicorn

        tls: dict[str, Any] = {}
        if tls_cert or tls_key or tls_ca:
            if not tls_cert:
                raise ConfigError("http.tls_key/tls_ca are set but http.tls_cert is empty.")
            for name, value in (("tls_cert", tls_cert), ("tls_key", tls_key), ("tls_ca", tls_ca)):
                if value and not os.access(value, os.R_OK):
                    raise ConfigError(f"http.{name} '{value}' is not a readable file.")
            tls = {"ssl_certfile": tls_cert, "ssl_keyfile": tls_key or None}
            if tls_ca:
                tls.update(ssl_ca_certs=tls_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        self.tls = bool(tls)
        # The event loop and HTTP parser are named, not "auto": uvicorn would otherwise switch to uvloop and
        # httptools whenever they happen to be installed (ray[serve] pulls them in), and the node's HTTP
        # behaviour (header limits, parsing of hostile requests: tests/security) would depend on that.
        self.config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                                     lifespan="off", timeout_graceful_shutdown=5, loop="asyncio", http="h11",
                                     ws="none", **tls)
        self.server = uvicorn.Server(self.config)
        self._thread: threading.Thread | None = None
        self.host = host
        self.port = port

    def start(self, timeout: float = 15.0) -> tuple[str, int]:
        """Start serving; returns the bound (host, port).

        Raises
        ------
        OSError
            When the server did not start (e.g. the port is in use).
        """
        self._thread = threading.Thread(target=self.server.run, name="http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"HTTP server did not start on {self.host}:{self.port}.")
            time.sleep(0.02)
        servers = getattr(self.server, "servers", [])
        for srv in servers:
            for sock in srv.sockets:
                self.port = int(sock.getsockname()[1])
                break
        logger.info("HTTP%s (DICOMweb) listening on %s:%d", "S" if self.tls else "", self.host, self.port)
        return self.host, self.port

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, finish running requests (up to the graceful timeout) and join the thread."""
        if self._thread is None:
            return
        self.server.should_exit = True
        self._thread.join(timeout)
        self._thread = None


__all__ = ["HttpServer", "create_app"]
