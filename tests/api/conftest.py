"""Fixtures for the API tests: one LiteMedSAM for the session, a small phantom CT in a store, the app."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from api_helpers import Api, PhantomSeries, api_settings, make_phantom_series  # noqa: E402,F401
from config.settings import ModelSettings, Settings  # noqa: E402


@pytest.fixture(scope="session")
def segmenter() -> Any:
    """One LiteMedSAM for the whole session: its embedding cache is shared by all tests."""
    from config.settings import LiteMedSAMSettings
    from models.litemedsam import LiteMedSAM

    return LiteMedSAM(LiteMedSAMSettings(), ModelSettings(device="cpu"))


@pytest.fixture(scope="session")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> PhantomSeries:
    return make_phantom_series(tmp_path_factory.mktemp("phantom"))


@pytest.fixture
def make_api(tmp_path: Path, segmenter: Any) -> Iterator[Callable[..., Api]]:
    """Factory: ``make_api(settings=None, series=[phantom...], outbox=None, loader=None)`` → :class:`Api`."""
    from starlette.testclient import TestClient

    from dicom_io.store import Store
    from node.api import api_routes, build_context
    from node.app import create_app
    from node.inference import InferencePool

    made: list[tuple[Any, Any, Any]] = []

    def _make(settings: Settings | None = None, series: list[PhantomSeries] = (), outbox: Any = None,
              loader: Callable[[str, Settings], Any] | None = None) -> Api:
        settings = settings or api_settings(tmp_path / f"node{len(made)}")
        store = Store.open(settings.store_path, durable=False)
        for s in series:
            for path in s.paths:
                store.put_file(path, kind="received")
        pool = InferencePool(settings, loader or (lambda name, s: segmenter))
        ctx = build_context(settings, store, pool, outbox=outbox)
        app = create_app(settings, store, routes=api_routes(settings, store, context=ctx))
        client = TestClient(app, raise_server_exceptions=True)
        client.__enter__()
        made.append((client, ctx, store))
        return Api(client, store, ctx, settings, app)

    yield _make
    for client, ctx, store in made:
        client.__exit__(None, None, None)
        ctx.inference.stop()
        ctx.close()
        store.close()


@pytest.fixture
def api(make_api: Callable[..., Api], phantom: PhantomSeries) -> Api:
    return make_api(series=[phantom])
