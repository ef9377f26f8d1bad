"""Exceptions of the running node (a small hierarchy under :class:`NodeError`).

The node's other error types live where the layer below defines them, one class each:
``config.settings.ConfigError`` (settings the node cannot run with), ``models.base.ModelError`` (a model
failed), ``dicom_io.errors.DicomInputError`` (bad DICOM input) and ``dicom_io.store.StoreFullError`` (the
store is below its free-space reserve). The HTTP answer of each is set in one place per application:
``node.app.create_app`` and ``node.api.api_routes`` (``exception_handlers``).
"""

from __future__ import annotations

from config.settings import ConfigError


class NodeError(Exception):
    """Base class of the node's own errors."""


class StoreBusyError(NodeError):
    """Another ``ainode serve`` already owns the store directory."""


__all__ = ["ConfigError", "NodeError", "StoreBusyError"]
