"""Exceptions of the running node (a small hierarchy under :class:`NodeError`)."""

from __future__ import annotations


class NodeError(Exception):
    """Base class of the node's own errors."""


class InvalidInstanceError(NodeError):
    """A received or given instance cannot be stored (undecodable, missing or invalid UIDs)."""


class PeerUnavailableError(NodeError):
    """A DICOM peer could not be reached or refused the association."""


class ModelError(NodeError):
    """A model failed to produce a result."""


class ConfigurationError(NodeError):
    """The node cannot start with the given settings (e.g. TLS files missing, unknown destination)."""


class StoreBusyError(NodeError):
    """Another ``ainode serve`` already owns the store directory."""
