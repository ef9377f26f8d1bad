"""Helpers for the security tests (a module of its own: several test folders have a conftest)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from config.settings import (
    ApiSettings,
    HttpSettings,
    LiteMedSAMSettings,
    ModelSettings,
    Secret,
    Settings,
    StoreSettings,
)

#: Tokens of the role-walk tests: one user per role set.
TOKENS = {
    "read": "tok-read-7f3a", "segment": "tok-seg-91bc", "admin": "tok-admin-c0de", "both": "tok-both-55aa",
}
TOKEN_ENTRIES = (Secret(f"reader:read:{TOKENS['read']}"), Secret(f"segmenter:segment:{TOKENS['segment']}"),
                 Secret(f"ops:admin:{TOKENS['admin']}"), Secret(f"alice:{TOKENS['both']}"))


def settings_for(data_dir: Path, *, tokens: tuple[Secret, ...] = (), http: HttpSettings | None = None,
                 **api: Any) -> Settings:
    extra = {k: api.pop(k) for k in ("destinations", "deliver_to", "dimse", "input") if k in api}
    # No background pre-encoding: these tests open sessions to check access, not to segment.
    return Settings(data_dir=str(data_dir), model=ModelSettings(device="cpu"),
                    litemedsam=LiteMedSAMSettings(preencode=False),
                    store=StoreSettings(min_free_gb=0.0), api=ApiSettings(tokens=tokens, **api),
                    http=http or HttpSettings(), **extra)


@dataclasses.dataclass
class App:
    client: Any
    store: Any
    ctx: Any
    settings: Settings
    app: Any

    def close(self) -> None:
        self.client.__exit__(None, None, None)
        self.ctx.inference.stop()
        self.ctx.close()
        self.store.close()


def build_app(settings: Settings, segmenter: Any, series_paths: Any = ()) -> App:
    from starlette.testclient import TestClient

    from dicom_io.store import Store
    from node.api import api_routes, build_context
    from node.app import create_app
    from node.inference import InferencePool

    store = Store.open(settings.store_path, durable=False)
    for path in series_paths:
        store.put_file(path, kind="received")
    pool = InferencePool(settings, lambda name, s: segmenter.get())
    ctx = build_context(settings, store, pool)
    app = create_app(settings, store, routes=api_routes(settings, store, context=ctx))
    client = TestClient(app, raise_server_exceptions=False)
    client.__enter__()
    return App(client, store, ctx, settings, app)


def walk_routes(routes: Any, prefix: str = "") -> Iterator[tuple[str, str, str]]:
    """Every (kind, method, path template) of a Starlette route tree; kind = route | mount (opaque app)."""
    from starlette.routing import Mount, Route

    for route in routes:
        if isinstance(route, Route):
            for method in sorted(route.methods or {"GET"}):
                yield "route", method, prefix + route.path
        elif isinstance(route, Mount):
            sub = route.routes
            if sub:
                yield from walk_routes(sub, prefix + route.path)
            else:
                yield "mount", "GET", prefix + route.path + "/{rest:path}"  # static files: GET only
        else:  # a route type this walk does not know must not go unnoticed
            yield "unknown", "GET", prefix + repr(route)


_PARAM = re.compile(r"\{([^}:]+)(?::[^}]+)?\}")

#: Sample values for path parameters (UIDs are valid DICOM UIDs that the store does not hold).
_SAMPLES = {"frames": "1", "tag": "7FE00010", "k": "0", "model": "segmentation", "rest": "index.html"}


def concrete(template: str) -> str:
    return _PARAM.sub(lambda m: _SAMPLES.get(m.group(1), "1.2.826.0.1.3680043.8.498.1"), template)
