"""The OHIF viewer served by the node at ``/ohif/`` (``[viewer]`` settings; docs/viewer.md).

The viewer is the prebuilt ``dist/`` of the npm package ``@ohif/app`` (pinned in scripts/install.sh,
unpacked into ``web/ohif/dist`` at install time; nothing is fetched at run time). This module:

- serves the dist under ``/ohif/`` with the SPA fallback OHIF's BrowserRouter needs (any path that is
  not a file answers ``index.html``). The package is built for the site root (``PUBLIC_URL="/"``), so
  the few root-absolute references (``index.html``'s links, webpack's public path in the bundles, font
  URLs in the CSS) are rewritten to ``/ohif/`` on the way out; the files on disk stay untouched;
- answers ``/ohif/app-config.js`` with a generated configuration: one DICOMweb data source on the
  node's own origin (browsers refuse cross-origin DICOMweb from archives without CORS, e.g. Orthanc),
  the onboarding tours and the confirmation prompts off (a SEG opened in the viewer is loaded onto its
  image at once);
- in archive mode (``viewer.archive`` names a ``dicomweb`` destination) proxies ``/ohif-archive/...``
  to that archive: the destination's authentication is added, a comma-separated ``includefield``
  (which OHIF sends and Orthanc's plugin ignores) is split into repeated parameters, and absolute
  archive URLs in the JSON answers (``BulkDataURI``, ``RetrieveURL``) are rewritten to the proxy.
  In embedded mode (``viewer.archive = ""``) the data source is the node's own ``/dicomweb``.

When the dist is not installed, ``/ohif/`` answers 503 with a page saying how to install it.

With ``viewer.ohif_ai_dist`` it also serves an OHIF-AI build unchanged at the site root (``/``,
``/viewer``..., every path whose first segment is not one of the node's own), beside ``/dicomweb`` and
the MONAI Label routes under ``api.monailabel_root_path`` (``/monai``): the same origin layout as
OHIF-AI's own nginx (docs/viewer.md).
"""

from __future__ import annotations

import json
import logging
import mimetypes
import os
import re
import ssl
import threading
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Match, Mount, Route
from starlette.types import Scope

from config.settings import ConfigError, DestinationSettings, Settings
from dicom_io.dicomweb import make_auth

logger = logging.getLogger(__name__)

#: Where scripts/install.sh unpacks ``@ohif/app``'s dist (relative to the repository root).
DIST = Path(__file__).resolve().parents[1] / "web" / "ohif" / "dist"
#: URL prefix of the viewer.
PREFIX = "/ohif"
#: URL prefix of the proxy to the archive (archive mode).
PROXY_PREFIX = "/ohif-archive"
#: Data source name in the generated app config.
SOURCE_NAME = "ainode"

NOT_INSTALLED = """<!doctype html><html><head><meta charset="utf-8"><title>OHIF viewer not installed</title></head>
<body style="font-family:sans-serif;max-width:40em;margin:3em auto">
<h1>The OHIF viewer is not installed</h1>
<p>The node serves the prebuilt viewer of the npm package <code>@ohif/app</code> from
<code>{dist}</code>, which is missing.</p>
<p>Install it with the set-up command: <code>bash scripts/install.sh</code></p>
<p>DICOMweb (<code>/dicomweb</code>) and the REST API work without it.</p>
</body></html>
"""

# Paths with these extensions are files: a missing one is a 404, not the SPA's index.html.
_FILE_EXT = {".js", ".mjs", ".css", ".wasm", ".map", ".json", ".png", ".jpg", ".svg", ".ico", ".gif",
             ".woff", ".woff2", ".ttf", ".eot", ".txt", ".xml", ".html", ".onnx", ".webmanifest"}
_TYPES = {".wasm": "application/wasm", ".mjs": "text/javascript", ".js": "text/javascript",
          ".css": "text/css", ".json": "application/json", ".woff2": "font/woff2", ".svg": "image/svg+xml"}
_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
        "transfer-encoding", "upgrade", "content-length", "content-encoding", "host"}
_PASS_RESPONSE = ("content-type", "warning", "etag", "last-modified", "cache-control", "content-location")


def app_config(data_root: str, *, name: str = "ainode", friendly_name: str = "ainode") -> str:
    """The OHIF ``app-config.js`` (``window.config``) for a data source rooted at ``data_root``.

    Parameters
    ----------
    data_root
        QIDO-RS / WADO-RS root as a path on the node's origin (``/dicomweb`` or the proxy's prefix) or
        an absolute URL.
    """
    cfg: dict[str, Any] = {
        "name": name,
        "routerBasename": PREFIX,
        "extensions": [],
        "modes": [],
        # Off: the onboarding tours (default-scope customization 'ohif.tours').
        "customizationService": {"ohif.tours": {"$set": []}},
        # Off: "Do you want to open this segmentation?" - a SEG opened in the viewer is loaded at once.
        "disableConfirmationPrompts": True,
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "maxNumRequests": {"interaction": 100, "thumbnail": 5, "prefetch": 10},
        "showErrorDetails": "always",
        "defaultDataSourceName": SOURCE_NAME,
        "dataSources": [{
            "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
            "sourceName": SOURCE_NAME,
            "configuration": {
                "friendlyName": friendly_name,
                "name": SOURCE_NAME,
                "qidoRoot": data_root,
                "wadoRoot": data_root,
                "wadoUriRoot": data_root,
                "qidoSupportsIncludeField": True,
                "supportsReject": False,
                "imageRendering": "wadors",
                "thumbnailRendering": "wadors",
                "enableStudyLazyLoad": True,
                "supportsFuzzyMatching": False,
                "supportsWildcard": True,
                "staticWado": False,
                "singlepart": "",
                "dicomUploadEnabled": False,
                "bulkDataURI": {"enabled": True},
                "omitQuotationForMultipartRequest": True,
            },
        }],
    }
    body = json.dumps(cfg, indent=1)
    # Relative roots are made absolute in the browser (OHIF's DICOMweb client wants full URLs).
    return ("/** Generated by ainode (node/viewer.py); OHIF @ohif/app app config. */\n"
            f"window.config = {body};\n"
            "(function (c) {\n"
            "  var origin = window.location.origin;\n"
            "  c.dataSources.forEach(function (ds) {\n"
            "    ['qidoRoot', 'wadoRoot', 'wadoUriRoot'].forEach(function (k) {\n"
            "      var v = ds.configuration[k];\n"
            "      if (v && v.charAt(0) === '/') ds.configuration[k] = origin + v;\n"
            "    });\n"
            "  });\n"
            "})(window.config);\n")


class _Dist:
    """An OHIF dist; with ``rewrite``, its root-absolute references moved under :data:`PREFIX` (cached in memory)."""

    def __init__(self, folder: Path, *, rewrite: bool = True) -> None:
        self.folder = folder.resolve()
        self.rewrite = rewrite
        self._cache: dict[tuple[str, int], bytes | None] = {}
        self._lock = threading.Lock()

    def installed(self) -> bool:
        return (self.folder / "index.html").is_file()

    def file(self, rel: str) -> Path | None:
        """The file for a URL path below the prefix, or None (also for anything outside the dist)."""
        rel = urllib.parse.unquote(rel).lstrip("/")
        if not rel or "\x00" in rel:
            return None
        path = (self.folder / rel).resolve()
        if path != self.folder and self.folder not in path.parents:
            return None
        return path if path.is_file() else None

    def rewritten(self, path: Path) -> bytes | None:
        """The file's bytes with references rewritten, or None when it needs no rewriting."""
        suffix = path.suffix
        if not self.rewrite or suffix not in (".html", ".js", ".css", ".json"):
            return None
        key = (str(path), path.stat().st_mtime_ns)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        data = path.read_bytes()
        new = _rewrite(suffix, data)
        out = None if new == data else new
        with self._lock:
            self._cache[key] = out
        return out


def _rewrite(suffix: str, data: bytes) -> bytes:
    p = PREFIX.encode()
    if suffix == ".html":
        data = data.replace(b'window.PUBLIC_URL="/"', b'window.PUBLIC_URL="' + p + b'/"')
        data = data.replace(b'href="/', b'href="' + p + b"/").replace(b'src="/', b'src="' + p + b"/")
        # No service worker: it would cache an old viewer and its config across node upgrades.
        data = re.sub(rb'<script[^>]*init-service-worker\.js"></script>', b"", data)
    elif suffix == ".js":
        data = data.replace(b'__webpack_require__.p = "/";', b'__webpack_require__.p = "' + p + b'/";')
    elif suffix == ".json":  # manifest.json's icons
        data = data.replace(b'"src": "/', b'"src": "' + p + b"/").replace(b'"src":"/', b'"src":"' + p + b"/")
    elif suffix == ".css":
        data = data.replace(b"url(/", b"url(" + p + b"/")
    return data


def _ssl(dest: DestinationSettings) -> ssl.SSLContext | bool:
    if not dest.verify_tls:
        return False
    if not (dest.tls_ca or dest.tls_cert):
        return True
    ctx = ssl.create_default_context(cafile=dest.tls_ca or None)
    if dest.tls_cert:
        ctx.load_cert_chain(dest.tls_cert, dest.tls_key or None)
    return ctx


def split_includefield(query: str) -> str:
    """``includefield=a,b`` as ``includefield=a&includefield=b`` (PS3.18 allows both; Orthanc reads only the latter)."""
    if "includefield" not in query.lower():
        return query
    items: list[tuple[str, str]] = []
    for k, v in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if k.lower() == "includefield":
            items.extend((k, x.strip()) for x in v.split(",") if x.strip())
        else:
            items.append((k, v))
    return urllib.parse.urlencode(items, safe="*,")


class ArchiveProxy:
    """Same-origin reverse proxy from :data:`PROXY_PREFIX` to a ``dicomweb`` destination (GET/HEAD only).

    QIDO-RS goes to ``url + qido_prefix``, everything else (WADO-RS) to ``url + wado_prefix``.
    """

    def __init__(self, name: str, dest: DestinationSettings) -> None:
        if dest.kind != "dicomweb" or not dest.url:
            raise ConfigError(f'viewer.archive "{name}" must name a destination with kind = "dicomweb" and a url.')
        self.name = name
        self.qido = _join(dest.url, dest.qido_prefix)
        self.wado = _join(dest.url, dest.wado_prefix)
        self._auth = make_auth(dest.auth, dest.username, dest.password.get_secret_value(),
                               dest.token.get_secret_value())
        self._verify = _ssl(dest)
        self._timeout = dest.timeout
        # Absolute archive URLs (any host: archives echo the Host header or use a configured public
        # root) whose path starts with the archive's QIDO/WADO path.
        paths = {urllib.parse.urlsplit(u).path.rstrip("/") for u in (self.qido, self.wado)}
        alternatives = "|".join(re.escape(p) for p in sorted(paths, key=len, reverse=True))
        self._absolute = re.compile(r'https?://[^/"\s]+(?:' + alternatives + r')(?=[/"?])')

    def client(self) -> httpx.AsyncClient:
        """A client for one request (closed with its response: no connection outlives the request)."""
        return httpx.AsyncClient(auth=self._auth, verify=self._verify, timeout=httpx.Timeout(self._timeout),
                                 follow_redirects=False)

    def upstream(self, rest: str, query: str) -> str:
        first = rest.strip("/").split("/")
        # QIDO-RS: /studies, /series, /instances and .../series, .../instances (searches) without a UID after.
        is_search = first[-1] in ("studies", "series", "instances") if first and first[0] else True
        base = self.qido if is_search else self.wado
        url = f"{base}/{rest.lstrip('/')}" if rest.strip("/") else base
        query = split_includefield(query)
        return f"{url}?{query}" if query else url

    async def handle(self, request: Request) -> Response:
        """The proxy's route endpoint."""
        rest = request.path_params.get("rest", "")
        if ".." in rest.split("/"):
            return JSONResponse({"error": "Bad path."}, status_code=400)
        url = self.upstream(rest, request.url.query)
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in _HOP and k.lower() not in ("authorization", "cookie", "accept-encoding",
                                                                   "origin", "referer")}
        proxy_root = f"{request.url.scheme}://{request.url.netloc}{PROXY_PREFIX}"
        client = self.client()
        try:
            req = client.build_request(request.method, url, headers=headers)
            upstream = await client.send(req, stream=True)
        except httpx.HTTPError as exc:
            await client.aclose()
            logger.warning("viewer proxy to %s: %s", self.name, type(exc).__name__)
            return JSONResponse({"error": f'Archive "{self.name}" cannot be reached: {type(exc).__name__}.'},
                                status_code=502)

        async def close() -> None:
            await upstream.aclose()
            await client.aclose()

        out_headers = {k: v for k, v in upstream.headers.items() if k.lower() in _PASS_RESPONSE}
        ctype = upstream.headers.get("content-type", "")
        if "json" in ctype:
            try:
                body = await upstream.aread()
            finally:
                await close()
            body = self._absolute.sub(lambda m: proxy_root, body.decode("utf-8", "replace")).encode()
            return Response(body, status_code=upstream.status_code, headers=out_headers)

        async def stream() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            finally:  # also when the browser goes away mid-stream
                await close()

        if upstream.headers.get("content-encoding"):
            # aiter_raw keeps the encoding: pass it on.
            out_headers["content-encoding"] = upstream.headers["content-encoding"]
        return StreamingResponse(stream(), status_code=upstream.status_code, headers=out_headers)


def _join(base: str, prefix: str) -> str:
    base = base.rstrip("/")
    prefix = prefix.strip("/")
    return f"{base}/{prefix}" if prefix else base


async def _serve_dist(files: _Dist, rest: str, index_response: Callable[[], Awaitable[Response]]) -> Response:
    """A file of the dist, 404 for a missing file name, else the SPA's ``index.html`` (a viewer route)."""
    path = files.file(rest)
    if path is None:
        if Path(rest).suffix.lower() in _FILE_EXT:
            return Response("Not found.", status_code=404, media_type="text/plain")
        return await index_response()  # SPA route (/ohif/viewer?..., /ohif/segmentation...)
    if path.name == "index.html":
        return await index_response()
    ctype = _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    data = await run_in_threadpool(files.rewritten, path)  # a 17 MB bundle is read once: not on the loop
    headers = {"Cache-Control": "public, max-age=3600"}
    if data is not None:
        return Response(data, media_type=ctype, headers=headers)
    return FileResponse(path, media_type=ctype, headers=headers)


class _SiteRootRoute(Route):
    """``GET /{rest:path}`` for the OHIF-AI viewer at the site root, matching only paths the node does not own.

    A path whose first segment is one of ``reserved`` (``dicomweb``, ``v1``, ``monai``...) is left to the
    node's routes, and so is a file name (a path with an extension) that the dist does not hold.
    """

    def __init__(self, files: _Dist, reserved: frozenset[str]) -> None:
        self.files = files
        self.reserved = reserved
        super().__init__("/{rest:path}", self._serve, methods=["GET", "HEAD"], name="ohif-ai")

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] == "http":
            path = scope.get("path", "")
            first = path.split("/")[1] if path.startswith("/") and len(path) > 1 else ""
            if first in self.reserved:
                return Match.NONE, {}
            rest = path.lstrip("/")
            if Path(rest).suffix and self.files.file(rest) is None:
                return Match.NONE, {}
        return super().matches(scope)

    async def _index(self) -> Response:
        return FileResponse(self.files.folder / "index.html", media_type="text/html; charset=utf-8",
                            headers={"Cache-Control": "no-cache"})

    async def _serve(self, request: Request) -> Response:
        return await _serve_dist(self.files, request.path_params.get("rest", ""), self._index)


def ohif_ai_routes(settings: Settings, reserved: frozenset[str] | set[str]) -> list[BaseRoute]:
    """The OHIF-AI viewer at the site root (``viewer.ohif_ai_dist``); none when that is empty.

    The build is served unchanged (it is built for ``PUBLIC_URL=/`` and its ``app-config.js`` reads
    ``/dicomweb`` on its own origin): files of the dist, ``.wasm`` as ``application/wasm``, and
    ``index.html`` for any other path without a file extension (its routes ``/``, ``/viewer``...).

    Parameters
    ----------
    settings
        Node settings.
    reserved
        First path segments of the node's own routes (never shadowed).

    Raises
    ------
    ConfigError
        When ``viewer.ohif_ai_dist`` holds no ``index.html``.
    """
    folder = settings.viewer.ohif_ai_dist
    if not folder:
        return []
    files = _Dist(Path(os.path.expanduser(folder)), rewrite=False)
    if not files.installed():
        raise ConfigError(f"viewer.ohif_ai_dist '{folder[:200]}' holds no index.html; point it at the unpacked "
                          "dist/ folder of an OHIF-AI build.")
    if settings.api.monailabel_root_path.rstrip("/") != "/monai":
        logger.warning("viewer.ohif_ai_dist is set but api.monailabel_root_path is %r: the OHIF-AI viewer calls "
                       "/monai/infer/segmentation on its own origin (set it to \"/monai\")",
                       settings.api.monailabel_root_path)
    logger.info("OHIF-AI viewer at / (from %s)", files.folder)
    return [_SiteRootRoute(files, frozenset(reserved))]


def viewer_routes(settings: Settings, dist: Path | None = None) -> list[BaseRoute]:
    """Routes of the viewer: ``/ohif/`` (and ``/ohif-archive/`` in archive mode); none when disabled.

    Raises
    ------
    ConfigError
        When ``viewer.archive`` names no ``dicomweb`` destination.
    """
    vs = settings.viewer
    if not vs.enabled:
        return []
    files = _Dist(Path(os.path.expanduser(vs.dist)) if vs.dist else (dist or DIST))
    proxy: ArchiveProxy | None = None
    if vs.archive:
        dest = settings.destinations.get(vs.archive)
        if dest is None:
            raise ConfigError(f'viewer.archive "{vs.archive}" is not a configured destination '
                              f"(known: {', '.join(sorted(settings.destinations)) or 'none'}).")
        proxy = ArchiveProxy(vs.archive, dest)
    data_root = PROXY_PREFIX if proxy is not None else "/dicomweb"
    config_js = app_config(data_root, friendly_name=vs.title or (f"ainode: {vs.archive}" if proxy else "ainode"))

    async def config(request: Request) -> Response:
        return Response(config_js, media_type="text/javascript", headers={"Cache-Control": "no-cache"})

    async def index_response() -> Response:
        if not files.installed():
            return HTMLResponse(NOT_INSTALLED.format(dist=files.folder), status_code=503)
        data = await run_in_threadpool(files.rewritten, files.folder / "index.html")
        return Response(data, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})

    async def serve(request: Request) -> Response:
        rest = request.path_params.get("rest", "")
        if not files.installed():
            return await index_response()
        return await _serve_dist(files, rest, index_response)

    async def root(request: Request) -> Response:
        query = request.url.query
        return RedirectResponse(PREFIX + "/" + (f"?{query}" if query else ""), status_code=308)

    routes: list[BaseRoute] = [
        Route(PREFIX, root, methods=["GET", "HEAD"]),
        Mount(PREFIX, routes=[
            Route("/app-config.js", config, methods=["GET", "HEAD"]),
            Route("/{rest:path}", serve, methods=["GET", "HEAD"]),
        ]),
    ]
    if proxy is not None:
        routes.append(Route(PROXY_PREFIX + "/{rest:path}", proxy.handle, methods=["GET", "HEAD"]))
    logger.info("OHIF viewer at %s/ (%s; data source %s)", PREFIX,
                "installed" if files.installed() else "NOT installed", data_root)
    return routes


__all__ = ["DIST", "PREFIX", "PROXY_PREFIX", "ArchiveProxy", "app_config", "ohif_ai_routes", "split_includefield",
           "viewer_routes"]
