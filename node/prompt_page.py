"""The node's own prompt page at ``/``: a cornerstone3D viewer that sends clicks and boxes to the /v1 sessions.

The page is a static bundle built from ``web/prompt`` (``npm ci && npm run build``, run by
``scripts/install.sh``) into ``web/prompt/dist``. This module only serves it: ``GET /`` answers the
page's ``index.html`` and ``/prompt/...`` its assets. When the bundle has not been built, ``GET /``
answers 503 with a short text saying how to build it (the API routes work either way).

The page holds no data and needs no token itself; it asks for the API's bearer token when the API
answers 401 and sends it with every API and DICOMweb request.
"""

from __future__ import annotations

import logging
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

logger = logging.getLogger(__name__)

#: Where ``npm run build`` in ``web/prompt`` writes the bundle (relative to the repository root).
DIST = Path(__file__).resolve().parents[1] / "web" / "prompt" / "dist"

#: What ``GET /`` answers when the bundle is missing.
NOT_BUILT = (
    "The ainode prompt page has not been built.\n\n"
    "Build it with the set-up command:\n"
    "    bash scripts/install.sh\n"
    "or by hand:\n"
    "    cd web/prompt && npm ci && npm run build\n\n"
    "The REST API (/v1, /openapi.json) and DICOMweb (/dicomweb) work without it.\n"
)


def prompt_page_routes(dist: Path | None = None) -> list[BaseRoute]:
    """Routes serving the prompt page: ``GET /`` and the bundle's assets under ``/prompt``.

    Parameters
    ----------
    dist
        The built bundle's folder (default :data:`DIST`); it may be missing (then ``/`` says how to build it).

    Returns
    -------
    list
        To be placed before the API's catch-all mount in :func:`node.app.create_app`.
    """
    folder = Path(dist) if dist is not None else DIST

    async def index(request: Request) -> Response:
        page = folder / "index.html"
        if not page.is_file():
            logger.info("GET / : the prompt page is not built (%s missing)", page)
            return PlainTextResponse(NOT_BUILT, status_code=503)
        # no-cache: a rebuilt bundle is picked up at the next load (asset names carry no hash).
        return FileResponse(page, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})

    return [
        Route("/", index, methods=["GET", "HEAD"]),
        Mount("/prompt", app=_Assets(folder), name="prompt"),
    ]


class _Assets:
    """The bundle's files (404 while the bundle is not built, instead of StaticFiles' error)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files = StaticFiles(directory=folder, check_dir=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.folder.is_dir():
            await PlainTextResponse(NOT_BUILT, status_code=404)(scope, receive, send)
            return
        await self.files(scope, receive, send)


__all__ = ["DIST", "NOT_BUILT", "prompt_page_routes"]
