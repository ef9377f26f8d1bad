"""DIMSE service class provider: C-ECHO and C-STORE into the durable store, with access control."""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any, cast

from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    _config,
    evt,
)
from pynetdicom.ae import ApplicationEntity
from pynetdicom.dimse_primitives import C_STORE

# sop_class creates its names at import from pynetdicom's UID tables, out of mypy's sight
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer
from pynetdicom.utils import make_target

from config.settings import ConfigError, Settings
from dicom_io import pynetdicom_speedups as speedups
from dicom_io.store import (
    InstanceInfo,
    InstanceValidationError,
    Store,
    StoreFullError,
    check_encoding,
    encode_file_meta,
    is_valid_uid,
)
from node import status

logger = logging.getLogger(__name__)

# A-ASSOCIATE-RJ parameters (PS3.8 9.3.4): result, source, reason.
REJECT_PERMANENT = 0x01
SOURCE_SERVICE_USER = 0x01
REASON_CALLING_AE_NOT_RECOGNISED = 0x03


@dataclass(frozen=True)
class StoredInstance:
    """What a successful C-STORE added (passed to ``on_stored`` listeners)."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    calling_ae_title: str
    duplicate: bool


class CallerPolicy:
    """Allow-list of calling AE titles, each optionally tied to a host (``AE`` or ``AE@host``).

    Host names are resolved once, when the policy is built. An empty list allows everyone.

    Raises
    ------
    ConfigError
        When an entry is empty or its host cannot be resolved.
    """

    def __init__(self, entries: Sequence[str]) -> None:
        self.rules: list[tuple[str, frozenset[str] | None]] = []
        for entry in entries:
            ae, sep, host = entry.strip().partition("@")
            ae = ae.strip()
            if not ae:
                raise ConfigError(f"Allowed caller '{entry}' has no AE title; use 'AE' or 'AE@host'.")
            self.rules.append((ae, _resolve(host.strip(), entry) if sep else None))

    def __bool__(self) -> bool:
        return bool(self.rules)

    def allows(self, calling_ae_title: str, address: str) -> bool:
        """True when the calling AE title (from ``address``) is on the list, or the list is empty."""
        if not self.rules:
            return True
        ae = calling_ae_title.strip()
        addr = _normalise_ip(address)
        return any(rule_ae == ae and (hosts is None or addr in hosts) for rule_ae, hosts in self.rules)


def _normalise_ip(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _resolve(host: str, entry: str) -> frozenset[str]:
    if not host:
        raise ConfigError(f"Allowed caller '{entry}' has an empty host.")
    try:
        return frozenset({str(ipaddress.ip_address(host))})
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError as exc:
        raise ConfigError(f"Allowed caller '{entry}': host '{host}' cannot be resolved ({exc}).") from exc
    return frozenset(_normalise_ip(str(info[4][0])) for info in infos)


# --- handlers -----------------------------------------------------------------------------------


def handle_echo(event: evt.Event) -> int:
    """C-ECHO: always Success (PS3.7 9.1.5)."""
    return status.SUCCESS


def handle_requested(event: evt.Event, policy: CallerPolicy) -> None:
    """A-ASSOCIATE-RQ received: reject (1, 1, 3) a calling AE title/host not on the allow-list."""
    assoc = event.assoc
    calling = str(getattr(assoc.requestor.primitive, "calling_ae_title", "") or "")
    address = str(assoc.requestor.address)
    if policy.allows(calling, address):
        return
    logger.warning("Rejecting association from %r at %s: calling AE title/host not allowed", calling, address)
    assoc.acse.send_reject(REJECT_PERMANENT, SOURCE_SERVICE_USER, REASON_CALLING_AE_NOT_RECOGNISED)
    assoc.kill()


def handle_store(
    event: evt.Event, store: Store, listeners: Sequence[Callable[[StoredInstance], None]] = ()
) -> int:
    """C-STORE: store the instance durably, then answer.

    The handler never decodes pixel data and never runs inference. Statuses (``node.status``):

    * ``SUCCESS`` - fsynced, renamed into the store, indexed; also for a SOP Instance UID already held.
    * ``CANNOT_DECODE`` (0xC210) - the data set cannot be parsed; quarantined.
    * ``INVALID_UID`` (0xC212) - SOP Class/Instance, Study or Series Instance UID missing or invalid;
      quarantined.
    * ``DATASET_DOES_NOT_MATCH_SOP_CLASS`` (0xA900) / ``SOP_INSTANCE_MISMATCH`` (0xC213) - the data
      set's UIDs differ from the command's; quarantined.
    * ``OUT_OF_RESOURCES`` (0xA700) - the store could not write (disk full, below ``min_free_gb``).
    * ``PROCESSING_FAILURE`` (0x0110) - anything unexpected (logged with a traceback).
    """
    assoc = event.assoc
    calling = str(assoc.requestor.ae_title or "")
    request = cast(C_STORE, event.request)  # an EVT_C_STORE event carries a C-STORE-RQ
    stream = cast(BytesIO, request.DataSet)  # the whole data set, in memory (not STORE_RECV_CHUNKED_DATASET)
    ts = str(event.context.transfer_syntax)
    cmd_class = str(request.AffectedSOPClassUID or "")
    cmd_instance = str(request.AffectedSOPInstanceUID or "")
    # Not a context manager: the store may keep the buffer (a journaled instance is placed on
    # another thread after the acknowledgement); it is released when the last reference goes.
    body = stream.getbuffer()
    header = b""
    try:
        if not (is_valid_uid(cmd_class) and is_valid_uid(cmd_instance)):
            raise InstanceValidationError(
                "The command's Affected SOP Class/Instance UID is not a valid UID.", kind="uid")
        header = encode_file_meta(
            cmd_class, cmd_instance, ts,
            implementation_class_uid=str(assoc.acceptor.implementation_class_uid),
            implementation_version_name=str(assoc.acceptor.implementation_version_name or ""),
            source_ae_title=calling,
        )
        # Structure check and index attributes straight from the bytes: nothing is decoded.
        info = InstanceInfo.from_raw(check_encoding(body, ts), ts)
        if info.sop_class_uid != cmd_class:
            raise InstanceValidationError(
                f"Data set SOP Class UID {info.sop_class_uid} differs from the command's {cmd_class}.",
                kind="sop_class_mismatch")
        if info.sop_instance_uid != cmd_instance:
            raise InstanceValidationError(
                f"Data set SOP Instance UID {info.sop_instance_uid} differs from the command's {cmd_instance}.",
                kind="sop_instance_mismatch")
    except InstanceValidationError as exc:
        code = {
            "uid": status.INVALID_UID,
            "sop_class_mismatch": status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            "sop_instance_mismatch": status.SOP_INSTANCE_MISMATCH,
        }.get(exc.kind, status.CANNOT_DECODE)
        shown = cmd_instance if is_valid_uid(cmd_instance) else "(invalid UID)"
        _quarantine(store, [header, body] if header else [body], f"{exc} (transfer syntax {ts})",
                    cmd_instance, calling)
        logger.warning("Refused instance %s from %r: %s -> %s", shown, calling, exc, status.describe(code))
        return code
    except Exception:
        logger.exception("Unexpected error checking an instance from %r", calling)
        return status.PROCESSING_FAILURE
    try:
        result = store.put([header, body], info, calling_ae_title=calling)
    except (StoreFullError, OSError) as exc:
        logger.error("Cannot store instance %s: %s", info.sop_instance_uid, exc)
        return status.OUT_OF_RESOURCES
    except Exception:
        logger.exception("Unexpected error storing instance %s", info.sop_instance_uid)
        return status.PROCESSING_FAILURE
    if result.duplicate:
        logger.debug("Instance %s already stored; acknowledged again", info.sop_instance_uid)
    stored = StoredInstance(info.sop_instance_uid, info.sop_class_uid, info.series_instance_uid,
                            info.study_instance_uid, calling, result.duplicate)
    for listener in listeners:
        try:
            listener(stored)
        except Exception:
            logger.exception("on_stored listener %r failed for %s", listener, info.sop_instance_uid)
    return status.SUCCESS


def _quarantine(store: Store, chunks: list[Any], reason: str, sop_uid: str, calling: str) -> None:
    try:
        store.quarantine(chunks, reason, sop_instance_uid=sop_uid, calling_ae_title=calling)
    except OSError as exc:
        logger.error("Cannot quarantine refused instance: %s", exc)


# --- server -------------------------------------------------------------------------------------


class _NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server plus TCP_NODELAY, and the TLS handshake off the accept loop."""

    handshake_timeout: float = 30.0

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        try:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        if self.ssl_context is not None:
            # Handshake happens in the connection's own thread (process_request_thread), so a silent or
            # plain-TCP client cannot stall the accept loop.
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            try:
                request.settimeout(self.handshake_timeout)
                request.do_handshake()
                request.settimeout(None)
            except (OSError, ValueError) as exc:
                logger.warning("TLS handshake with %s failed: %s", client_address[0], exc)
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)


def ssl_server_context(cert: str, key: str, ca: str = "") -> ssl.SSLContext:
    """A server-side TLS context; with ``ca`` clients must present a certificate signed by it.

    Raises
    ------
    ConfigError
        When a file cannot be loaded.
    """
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(certfile=cert, keyfile=key or None)
        if ca:
            ctx.load_verify_locations(cafile=ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"DICOM TLS files cannot be loaded (cert '{cert}', key '{key}', ca '{ca}'): {exc}") from exc
    return ctx


def make_ae(settings: Settings) -> ApplicationEntity:
    """The node's AE: Verification and every storage SOP class, all transfer syntaxes, explicit limits."""
    d = settings.dimse
    ae = AE(ae_title=d.ae_title)
    ae.maximum_associations = d.max_associations
    ae.maximum_pdu_size = d.max_pdu
    ae.acse_timeout = d.acse_timeout
    ae.dimse_timeout = d.dimse_timeout
    ae.network_timeout = d.network_timeout
    ae.require_called_aet = d.require_called_ae_title
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
    for cx in AllStoragePresentationContexts:
        if cx.abstract_syntax is not None:  # always set in pynetdicom's tables; None only in its type
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    return ae


class DimseServer:
    """The running DIMSE listener(s) of the node.

    Parameters
    ----------
    settings
        Node settings (``settings.dimse``).
    store
        Where received instances go.
    on_stored
        Callables invoked after each successful C-STORE (in the association's thread; keep them quick).
    """

    def __init__(
        self,
        settings: Settings,
        store: Store,
        on_stored: Iterable[Callable[[StoredInstance], None]] = (),
    ) -> None:
        self.settings = settings
        self.store = store
        self.listeners = list(on_stored)
        self.policy = CallerPolicy(settings.dimse.allowed_callers)
        self.ae = make_ae(settings)
        self.servers: list[_NodeServer] = []
        self._threads: list[threading.Thread] = []

    def handlers(self) -> list[Any]:
        return [
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store, [self.store, self.listeners]),
            (evt.EVT_REQUESTED, handle_requested, [self.policy]),
        ]

    def start(self) -> list[tuple[str, int]]:
        """Start listening; returns the bound ``(host, port)`` addresses (plain first, then TLS).

        Raises
        ------
        ConfigError
            When TLS is required but no certificate is configured, or TLS files cannot be loaded.
        OSError
            When a port cannot be bound.
        """
        d = self.settings.dimse
        # pynetdicom logs whole identifier data sets at some levels: never do that here.
        _config.LOG_REQUEST_IDENTIFIERS = False
        speedups.log_inactive()
        _config.LOG_RESPONSE_IDENTIFIERS = False
        # No per-PDU/per-message logging handlers: they cost time on every C-STORE and can dump data sets.
        _config.LOG_HANDLER_LEVEL = "none"
        _config.UNRESTRICTED_STORAGE_SERVICE = d.accept_unknown_sop_classes
        tls = ssl_server_context(d.tls_cert, d.tls_key, d.tls_ca) if d.tls_cert else None
        if d.require_tls and tls is None:
            raise ConfigError("dimse.require_tls is set but dimse.tls_cert is empty.")
        listeners: list[tuple[int, ssl.SSLContext | None]] = []
        if tls is not None and d.require_tls:
            listeners.append((d.port, tls))
        else:
            listeners.append((d.port, None))
            if tls is not None:
                listeners.append((d.tls_port, tls))
        addresses = []
        for port, ctx in listeners:
            server = cast(_NodeServer, self.ae.make_server(
                (d.host, port), ae_title=d.ae_title, ssl_context=ctx, evt_handlers=self.handlers(),
                server_class=_NodeServer,
            ))
            server.handshake_timeout = d.acse_timeout
            if speedups.ACTIVE:
                server.RequestHandlerClass = speedups.FastRequestHandler
            thread = threading.Thread(target=make_target(server.serve_forever), name=f"dimse-{port}", daemon=True)
            thread.start()
            self.ae._servers.append(server)  # so AE.shutdown() and server.shutdown() find it
            self.servers.append(server)
            self._threads.append(thread)
            host, bound = server.server_address[:2]
            addresses.append((str(host), int(bound)))
            logger.info("DIMSE listening on %s:%d as %s%s", host, bound, d.ae_title, " (TLS)" if ctx else "")
        return addresses

    def stop(self) -> None:
        """Stop accepting, abort running associations and close the sockets."""
        for server in self.servers:
            for assoc in server.active_associations:
                assoc.abort()
            server.shutdown()
        self.servers.clear()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads.clear()
