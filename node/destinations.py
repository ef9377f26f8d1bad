"""Where results go: one lookup of ``[destinations.NAME]`` and one :class:`Destination` interface per kind."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from config.settings import DestinationSettings, Settings
from dicom_io.scu import Peer, StoreResult, client_tls_context, send_instances
from node.errors import ConfigError

if TYPE_CHECKING:
    from node.archives import Origins

logger = logging.getLogger(__name__)

#: The kinds of destination (``[destinations.NAME] kind``).
KINDS = ("dimse", "dicomweb", "xnat")

#: Called with (index into the paths, its result) as each answer arrives (DIMSE answers one by one).
OnResponse = Callable[[int, StoreResult], None]


def lookup(name: str, settings: Settings) -> DestinationSettings:
    """The configured destination ``name`` (the one place a destination name is resolved).

    Raises
    ------
    ConfigError
        When it is not configured or its ``kind`` is unknown.
    """
    dest = settings.destinations.get(name)
    if dest is None:
        known = ", ".join(sorted(settings.destinations)) or "none configured"
        raise ConfigError(f"Destination '{name}' is not configured (known: {known}).")
    if dest.kind not in KINDS:
        raise ConfigError(f"Destination '{name}' has kind '{dest.kind}'; use one of {', '.join(KINDS)}.")
    return dest


def validate_names(names: Iterable[str], settings: Settings) -> list[str]:
    """Destination names checked with :func:`lookup`, de-duplicated in order.

    Raises
    ------
    ConfigError
        When a name is not configured (or of an unknown kind).
    """
    out: list[str] = []
    for name in names:
        lookup(name, settings)
        if name not in out:
            out.append(name)
    return out


class Destination(Protocol):
    """A place results are delivered to; answers use DIMSE status semantics (``node.status``).

    Success or warning = delivered; ``None`` or 0xA7xx = retry later; other codes = refused for good.
    A peer's refusal is a returned status, never an exception.
    """

    name: str
    kind: str

    def send(self, paths: Sequence[Path], on_response: OnResponse | None = None) -> list[StoreResult]:
        """Deliver ``paths``; one result per path, in order.

        ``on_response`` is called for each answer as it arrives; results it was called for may be
        left out of the returned list by implementations that report them that way (DIMSE).
        """
        ...


@dataclass
class DimseDestination:
    """A C-STORE peer."""

    name: str
    peer: Peer
    kind: str = "dimse"

    @classmethod
    def from_settings(cls, name: str, dest: DestinationSettings, settings: Settings) -> DimseDestination:
        tls = client_tls_context(dest.tls_ca, dest.tls_cert, dest.tls_key) if dest.tls else None
        return cls(name, Peer(ae_title=dest.ae_title, host=dest.host, port=dest.port,
                              calling_ae_title=dest.calling_ae_title or settings.dimse.ae_title,
                              tls=tls, timeout=dest.timeout))

    def send(self, paths: Sequence[Path], on_response: OnResponse | None = None) -> list[StoreResult]:
        return send_instances(self.peer, list(paths), on_response=on_response)


@dataclass
class DicomwebDestination:
    """A STOW-RS archive."""

    name: str
    settings: Settings
    kind: str = "dicomweb"

    def send(self, paths: Sequence[Path], on_response: OnResponse | None = None) -> list[StoreResult]:
        from node.archives import open_dicomweb

        with open_dicomweb(self.name, self.settings) as client:
            return client.store_instances(list(paths))


@dataclass
class XnatDestination:
    """An XNAT server; a SEG goes into the session its study was pulled from (``origins``)."""

    name: str
    settings: Settings
    origins: Origins | None = None
    kind: str = "xnat"

    def send(self, paths: Sequence[Path], on_response: OnResponse | None = None) -> list[StoreResult]:
        from dicom_io.store import InstanceInfo
        from dicom_io.xnat import XnatSession
        from node.archives import Origins, open_xnat

        own = self.origins is None
        known = Origins.for_settings(self.settings) if self.origins is None else self.origins

        def session_for(info: InstanceInfo) -> XnatSession | None:
            origin = known.of_study(info.study_instance_uid, self.name)
            if origin is None or not origin.xnat_session:
                return None
            return XnatSession(origin.xnat_session, project=origin.xnat_project, subject=origin.xnat_subject,
                               study_instance_uid=origin.study_instance_uid)

        try:
            with open_xnat(self.name, self.settings) as xnat:
                return xnat.store_instances(list(paths), session_for=session_for)
        finally:
            if own:
                known.close()


def open_destination(name: str, settings: Settings, origins: Origins | None = None) -> Destination:
    """The :class:`Destination` for a configured name.

    Raises
    ------
    ConfigError
        When the destination is missing, of an unknown kind, or its settings are unusable.
    """
    dest = lookup(name, settings)
    if dest.kind == "dicomweb":
        return DicomwebDestination(name, settings)
    if dest.kind == "xnat":
        return XnatDestination(name, settings, origins)
    try:
        return DimseDestination.from_settings(name, dest, settings)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"Destination '{name}': {exc}") from exc


__all__ = ["KINDS", "Destination", "DicomwebDestination", "DimseDestination", "OnResponse", "XnatDestination",
           "lookup", "open_destination", "validate_names"]
