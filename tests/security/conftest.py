"""Fixtures for the security tests: one LiteMedSAM for the session, an in-process app factory."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

_HERE = Path(__file__).resolve().parent
for _p in (_HERE.parents[1], _HERE.parent, _HERE, _HERE.parent / "api", _HERE.parent / "dicomweb"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from sec_helpers import App, build_app  # noqa: E402


class LazySegmenter:
    """LiteMedSAM loaded on first use (only the tests that segment pay for it); one per session."""

    def __init__(self) -> None:
        self._model: Any = None

    def get(self) -> Any:
        if self._model is None:
            from config.settings import LiteMedSAMSettings, ModelSettings
            from models.litemedsam import LiteMedSAM

            self._model = LiteMedSAM(LiteMedSAMSettings(), ModelSettings(device="cpu"))
        return self._model


@pytest.fixture(scope="session")
def segmenter() -> LazySegmenter:
    return LazySegmenter()


@pytest.fixture
def make_app(tmp_path: Path, segmenter: Any) -> Iterator[Callable[..., App]]:
    """Factory: ``make_app(settings, series_paths=())`` → :class:`App` (TestClient over ``create_app``)."""
    made: list[App] = []

    def _make(settings: Any, series_paths: list[Path] = ()) -> App:
        app = build_app(settings, segmenter, series_paths)
        made.append(app)
        return app

    yield _make
    for app in made:
        app.close()
