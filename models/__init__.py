"""Model layer: promptable segmenters (LiteMedSAM, SAM2) behind the :class:`Segmenter` interface.

Importing this package does not import torch; models load lazily through
:func:`models.registry.load_segmenter`.
"""

from __future__ import annotations

from models.base import (
    BoxPrompt,
    ImageVolume,
    Mode,
    ModelError,
    PointPrompt,
    ProgressCallback,
    PromptError,
    Prompts,
    SegmentationResult,
    Segmenter,
)
from models.registry import available_models, load_segmenter

__all__ = [
    "BoxPrompt",
    "ImageVolume",
    "Mode",
    "ModelError",
    "PointPrompt",
    "ProgressCallback",
    "PromptError",
    "Prompts",
    "SegmentationResult",
    "Segmenter",
    "available_models",
    "load_segmenter",
]
