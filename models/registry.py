"""Model registry: load a segmenter by name, once per process."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - typing only
    from config.settings import Settings
    from models.base import Segmenter

logger = logging.getLogger(__name__)

_LOCK = threading.Lock()
_CACHE: dict[tuple[object, ...], Segmenter] = {}


def _cache_key(name: str, settings: Settings) -> tuple[object, ...]:
    # Only the settings sections a model depends on; frozen dataclasses are hashable.
    if name == "litemedsam":
        return (name, settings.model, settings.litemedsam, settings.data_dir)
    return (name, settings.model, settings.sam2, settings.litemedsam)


def _build_litemedsam(settings: Settings) -> Segmenter:
    from models.litemedsam import LiteMedSAM

    return LiteMedSAM(settings.litemedsam, settings.model, cache_dir=settings.data_path / "embeddings")


def _build_sam2(settings: Settings) -> Segmenter:
    from models.intensity import IntensityParams
    from models.sam2 import SAM2Segmenter

    return SAM2Segmenter(settings.sam2, settings.model, IntensityParams.from_settings(settings.litemedsam))


_BUILDERS: dict[str, Callable[[Settings], Segmenter]] = {
    "litemedsam": _build_litemedsam,
    "sam2": _build_sam2,
}


def available_models() -> list[str]:
    """Names accepted by :func:`load_segmenter`."""
    return sorted(_BUILDERS)


def load_segmenter(name: str, settings: Settings) -> Segmenter:
    """Return the segmenter called ``name``, loading it on first use.

    Instances are cached per process and per relevant settings (``[model]`` plus the model's own
    section), so repeated calls return the same object with its embedding cache.

    Parameters
    ----------
    name
        ``litemedsam`` or ``sam2`` (case-insensitive).
    settings
        Node settings.

    Returns
    -------
    Segmenter
        The loaded model.

    Raises
    ------
    ValueError
        When ``name`` is not a known model (the message lists the known ones).
    ModelError
        When the model cannot be loaded (missing or mismatched checkpoint, unavailable device).
    """
    key_name = (name or "").strip().lower()
    builder = _BUILDERS.get(key_name)
    if builder is None:
        raise ValueError(f"model {name!r} is unknown; known models: {', '.join(available_models())}.")
    key = _cache_key(key_name, settings)
    with _LOCK:
        seg = _CACHE.get(key)
        if seg is None:
            logger.info("loading model %s", key_name)
            seg = builder(settings)
            _CACHE[key] = seg
        return seg


def clear_cache() -> None:
    """Forget loaded models (tests, or to free memory)."""
    with _LOCK:
        _CACHE.clear()
