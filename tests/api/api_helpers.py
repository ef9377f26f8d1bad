"""Helpers shared by the API tests (a module of its own: several test folders have a conftest)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from config.settings import ApiSettings, ModelSettings, Settings, StoreSettings

#: (slices, rows, columns) and (column, row, slice) spacing of the test phantom: small, so the encoder is cheap.
SHAPE = (10, 80, 80)
SPACING = (1.2, 1.2, 3.0)


@dataclasses.dataclass
class PhantomSeries:
    """A phantom series written to disk, with where its lesion is on its largest slice."""

    paths: list[Path]
    mask: np.ndarray
    series_instance_uid: str
    study_instance_uid: str
    k: int
    center: tuple[float, float]
    box: tuple[float, float, float, float]


def make_phantom_series(out: Path, **kw: Any) -> PhantomSeries:
    from dicom_io.phantom import write_phantom_series

    p = write_phantom_series(out, shape=kw.pop("shape", SHAPE), spacing=kw.pop("spacing", SPACING), **kw)
    k = int(np.argmax(p.mask.sum(axis=(1, 2))))
    ys, xs = np.nonzero(p.mask[k])
    box = (float(xs.min() - 3), float(ys.min() - 3), float(xs.max() + 3), float(ys.max() + 3))
    return PhantomSeries(p.paths, p.mask, p.series_instance_uid, p.study_instance_uid, k,
                         (float(xs.mean()), float(ys.mean())), box)


def api_settings(data_dir: Path, **api: Any) -> Settings:
    extra = {k: api.pop(k) for k in ("destinations", "deliver_to") if k in api}
    return Settings(data_dir=str(data_dir), model=ModelSettings(device="cpu"),
                    store=StoreSettings(min_free_gb=0.0), api=ApiSettings(**api), **extra)


@dataclasses.dataclass
class Api:
    """A running app: its TestClient, store, context and settings."""

    client: Any
    store: Any
    ctx: Any
    settings: Settings
    app: Any
