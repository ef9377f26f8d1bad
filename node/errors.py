"""Exceptions of the running node (a small hierarchy under :class:`NodeError`)."""

from __future__ import annotations


class NodeError(Exception):
    """Base class of the node's own errors."""


class ModelError(NodeError):
    """A model failed to produce a result."""


class ConfigurationError(NodeError):
    """The node cannot start with the given settings (e.g. TLS files missing, unknown destination)."""


class StoreBusyError(NodeError):
    """Another ``ainode serve`` already owns the store directory."""
