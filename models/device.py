"""Torch device selection shared by the model wrappers."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from models.base import ModelError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

logger = logging.getLogger(__name__)


def resolve_device(spec: str = "auto", threads: int = 0) -> torch.device:
    """Turn a device setting into a torch device and apply the CPU thread count.

    Parameters
    ----------
    spec
        ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``
        (``[model] device`` / ``AINODE_MODEL_DEVICE``).
    threads
        Torch intra-op threads; values > 0 call ``torch.set_num_threads``, 0 keeps torch's default.

    Returns
    -------
    torch.device
        The device to run on.

    Raises
    ------
    ValueError
        When ``spec`` is not one of the forms above or ``threads`` is negative.
    ModelError
        When CUDA is requested but not available, or the CUDA index does not exist.
    """
    import torch

    if threads < 0:
        raise ValueError(f"threads must be >= 0, got {threads}.")
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
        logger.debug("torch threads set to %d", threads)

    text = (spec or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        index_text = text.partition(":")[2] or "0"
        if not index_text.isdigit():
            raise ValueError(f"device {spec!r}: expected 'cuda' or 'cuda:N' with an integer N.")
        index = int(index_text)
        if not torch.cuda.is_available():
            raise ModelError(
                f"device {spec!r} requested but CUDA is not available on this machine "
                "(no GPU, driver or CUDA-enabled torch); set AINODE_MODEL_DEVICE=cpu or auto."
            )
        if index >= torch.cuda.device_count():
            raise ModelError(
                f"device {spec!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist; "
                "set AINODE_MODEL_DEVICE to an existing cuda:N, or auto."
            )
        return torch.device(f"cuda:{index}")
    raise ValueError(f"device {spec!r} is not valid: use 'auto', 'cpu', 'cuda' or 'cuda:N'.")
