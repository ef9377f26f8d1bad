"""DIMSE status codes the node returns and understands (PS3.7 Annex C, PS3.4 B.2.3)."""

from __future__ import annotations

import enum

#: Success.
SUCCESS = 0x0000

# --- General failures (PS3.7 C.4) ---------------------------------------------------------------
#: Processing failure (general).
PROCESSING_FAILURE = 0x0110
#: The SOP class is not supported.
SOP_CLASS_NOT_SUPPORTED = 0x0122
#: The peer is not authorised to store.
NOT_AUTHORISED = 0x0124

# --- Storage service failures (PS3.4 B.2.3) -----------------------------------------------------
#: Refused: out of resources (disk full, store not writable).
OUT_OF_RESOURCES = 0xA700
#: Error: the data set does not match the SOP class (command and data set SOP Class UIDs differ).
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
#: Error: cannot understand (generic).
CANNOT_UNDERSTAND = 0xC000
#: Error: cannot understand - the data set could not be decoded.
CANNOT_DECODE = 0xC210
#: Error: cannot understand - an exception escaped a handler (pynetdicom's own code for that case).
HANDLER_EXCEPTION = 0xC211
#: Error: cannot understand - SOP Class/Instance, Study or Series Instance UID missing or not a valid UID.
INVALID_UID = 0xC212
#: Error: cannot understand - the data set's SOP Instance UID differs from the command's.
SOP_INSTANCE_MISMATCH = 0xC213

# --- Storage warnings (PS3.4 B.2.3) -------------------------------------------------------------
#: Warning: coercion of data elements.
WARNING_COERCION = 0xB000
#: Warning: elements discarded.
WARNING_ELEMENTS_DISCARDED = 0xB006
#: Warning: data set does not match SOP class.
WARNING_DATASET_DOES_NOT_MATCH = 0xB007


class Category(enum.Enum):
    """How a status code is to be treated."""

    SUCCESS = "success"
    WARNING = "warning"
    FAILURE = "failure"
    #: No status: the peer never answered (connection refused, association rejected or aborted, timeout).
    NO_RESPONSE = "no-response"


def category(status: int | None) -> Category:
    """Return the :class:`Category` of a C-STORE/C-ECHO status (``None`` = no response).

    Parameters
    ----------
    status
        The (0000,0900) Status value, or None when no response was received.
    """
    if status is None:
        return Category.NO_RESPONSE
    if status == SUCCESS:
        return Category.SUCCESS
    if status in (0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF:
        return Category.WARNING
    return Category.FAILURE


def is_delivered(status: int | None) -> bool:
    """True when a C-STORE status means the peer holds the instance (success or warning)."""
    return category(status) in (Category.SUCCESS, Category.WARNING)


def is_retryable(status: int | None) -> bool:
    """True when a failed delivery is worth retrying later.

    No response (peer down, association rejected or aborted), out of resources (0xA7xx) and a
    general processing failure are transient; other failures are the peer's considered refusal.
    """
    if status is None:
        return True
    return 0xA700 <= status <= 0xA7FF or status == PROCESSING_FAILURE


_NAMES = {
    SUCCESS: "Success",
    PROCESSING_FAILURE: "Processing failure",
    SOP_CLASS_NOT_SUPPORTED: "SOP class not supported",
    NOT_AUTHORISED: "Not authorised",
    OUT_OF_RESOURCES: "Out of resources",
    DATASET_DOES_NOT_MATCH_SOP_CLASS: "Data set does not match SOP class",
    CANNOT_UNDERSTAND: "Cannot understand",
    CANNOT_DECODE: "Cannot understand: data set cannot be decoded",
    HANDLER_EXCEPTION: "Cannot understand: handler exception",
    INVALID_UID: "Cannot understand: required UID missing or invalid",
    SOP_INSTANCE_MISMATCH: "Cannot understand: SOP Instance UID differs from the command",
    WARNING_COERCION: "Warning: coercion of data elements",
    WARNING_ELEMENTS_DISCARDED: "Warning: elements discarded",
    WARNING_DATASET_DOES_NOT_MATCH: "Warning: data set does not match SOP class",
}


def describe(status: int | None) -> str:
    """A short human-readable text for a status, e.g. ``0xC210 Cannot understand: ...``."""
    if status is None:
        return "no response"
    name = _NAMES.get(status)
    if name is None:
        name = {Category.SUCCESS: "Success", Category.WARNING: "Warning"}.get(category(status), "Failure")
    return f"0x{status:04X} {name}"
