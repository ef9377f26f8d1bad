"""Exceptions raised for DICOM input that cannot be turned into a volume."""

from __future__ import annotations


class DicomInputError(ValueError):
    """Bad DICOM input; the message names the offending file/instance and the reason."""


class NotDicomError(DicomInputError):
    """A file given explicitly is not a readable DICOM file."""


class SeriesError(DicomInputError):
    """The instances cannot be assembled into one consistent volume."""


class UnsafeArchiveError(DicomInputError):
    """A zip archive is malformed, too large, or has members that would escape the extraction folder."""
