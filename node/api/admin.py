"""Administration endpoints (role ``admin``): the effective configuration and the outbox."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from config.settings import Secret
from node.api.core import ApiContext, ApiError

#: Outbox states a listing can be filtered by.
_STATES = ("pending", "delivered", "failed")


def settings_json(value: Any) -> Any:
    """Settings as JSON-able data; every :class:`Secret` is masked."""
    if isinstance(value, Secret):
        return "**********" if value else ""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: settings_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): settings_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [settings_json(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


class AdminApi:
    """``GET /v1/config`` and ``GET /v1/outbox`` (``?state=pending|delivered|failed&limit=N``)."""

    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def config(self, request: Request) -> Response:
        return JSONResponse(settings_json(self.ctx.settings))

    async def outbox(self, request: Request) -> Response:
        state = request.query_params.get("state") or None
        if state is not None and state not in _STATES:
            raise ApiError(422, f"state: '{state}' is not one of {', '.join(_STATES)}.", "state")
        raw = request.query_params.get("limit", "100")
        if not raw.isdigit() or not 1 <= int(raw) <= 10000:
            raise ApiError(422, f"limit: '{raw[:20]}' is not a number from 1 to 10000.", "limit")
        outbox = self.ctx.outbox
        if outbox is None:
            return JSONResponse({"counts": {}, "entries": []})

        def read() -> dict[str, Any]:
            entries = outbox.entries(state)[-int(raw):]
            return {"counts": outbox.counts(), "entries": [
                {"id": e.id, "sop_instance_uid": e.sop_instance_uid, "destination": e.destination,
                 "state": e.state, "attempts": e.attempts, "next_attempt": e.next_attempt,
                 "last_status": e.last_status, "last_error": e.last_error or None, "created": e.created,
                 "delivered_at": e.delivered_at} for e in entries]}

        return JSONResponse(await run_in_threadpool(read))

    def routes(self) -> list[BaseRoute]:
        return [Route("/v1/config", self.config, methods=["GET"]),
                Route("/v1/outbox", self.outbox, methods=["GET"])]


__all__ = ["AdminApi", "settings_json"]
