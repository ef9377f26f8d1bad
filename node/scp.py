"""DIMSE service class provider: C-ECHO and C-STORE into the durable store, with access control."""

from __future__ import annotations

import ipaddress
import logging
import os
import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from io import BytesIO
from dataclasses import dataclass
from typing import Any, cast

import pynetdicom
from pynetdicom import (
    ALL_TRANSFER_SYNTAXES,
    AE,
    AllStoragePresentationContexts,
    _config,
    evt,
)
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer
from pynetdicom.utils import make_target

from config.settings import Settings
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
from node.errors import ConfigurationError

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
    ConfigurationError
        When an entry is empty or its host cannot be resolved.
    """

    def __init__(self, entries: Sequence[str]) -> None:
        self.rules: list[tuple[str, frozenset[str] | None]] = []
        for entry in entries:
            ae, sep, host = entry.strip().partition("@")
            ae = ae.strip()
            if not ae:
                raise ConfigurationError(f"Allowed caller '{entry}' has no AE title; use 'AE' or 'AE@host'.")
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
        raise ConfigurationError(f"Allowed caller '{entry}' has an empty host.")
    try:
        return frozenset({str(ipaddress.ip_address(host))})
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError as exc:
        raise ConfigurationError(f"Allowed caller '{entry}': host '{host}' cannot be resolved ({exc}).") from exc
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
    request = event.request
    stream = request.DataSet
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


# --- event-driven acceptor (pynetdicom 3.0) ------------------------------------------------------
#
# pynetdicom's DUL and association reactors poll: each sleeps 1 ms between looks at the socket and at
# the DIMSE queue, which costs ~3 ms per C-STORE (three hand-offs). These subclasses wait on the
# socket / a wake-up pipe / the DIMSE queue instead, so a hand-off is immediate. The loops are
# pynetdicom 3.0.4's own, with only the waits changed; other pynetdicom versions use the stock classes.

_FAST_OK = pynetdicom.__version__.startswith("3.0.")
#: Longest wait of an idle reactor before it re-checks its timers and kill flag (seconds).
_IDLE_WAIT = 0.01


class _FastDUL(DULServiceProvider):
    def __init__(self, assoc: Any) -> None:
        super().__init__(assoc)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass

    def _wait(self, timeout: float) -> None:
        fds: list[Any] = [self._wake_r]
        sock = getattr(self.socket, "socket", None)
        if sock is not None:
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                return
            try:
                if sock.fileno() >= 0:
                    fds.append(sock)
            except OSError:
                pass
        try:
            ready, _, _ = select.select(fds, [], [], timeout)
        except (OSError, ValueError):
            time.sleep(0.001)
            return
        if self._wake_r in ready:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except OSError:
                pass

    def run_reactor(self) -> None:  # pynetdicom 3.0.4 DULServiceProvider.run_reactor, waits changed
        self._idle_timer.start()
        sleep = False
        try:
            while True:
                if not self.assoc._dul_ready.is_set():
                    self.assoc._dul_ready.set()
                    sleep = True
                if sleep:
                    self._wait(_IDLE_WAIT)
                if self._kill_thread:
                    break
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                try:
                    if self._process_recv_primitive():
                        pass
                    elif self._is_transport_event():
                        self._idle_timer.restart()
                except Exception as exc:
                    logger.error("DUL error, aborting association: %s", exc)
                    abort_pdu = A_ABORT_RQ()
                    abort_pdu.source = 0x02
                    abort_pdu.reason_diagnostic = 0x00
                    try:
                        self.socket.send(abort_pdu.encode())
                    except Exception:
                        pass
                    self.assoc.is_aborted = True
                    self.assoc.is_established = False
                    self.assoc._kill = True
                    self._kill_thread = True
                    return
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    sleep = True
                    continue
                self.state_machine.do_action(event)
                sleep = False
        finally:
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass


def _ui(tag_elem: int, value: str) -> bytes:
    raw = value.encode("ascii")
    if len(raw) % 2:
        raw += b"\x00"
    return b"\x00\x00" + tag_elem.to_bytes(2, "little") + len(raw).to_bytes(4, "little") + raw


def _us(tag_elem: int, value: int) -> bytes:
    return b"\x00\x00" + tag_elem.to_bytes(2, "little") + b"\x02\x00\x00\x00" + value.to_bytes(2, "little")


class _FastDIMSE(DIMSEServiceProvider):
    """C-STORE messages without pydicom data sets for the command (each costs ~0.3 ms otherwise).

    Incoming C-STORE-RQs are assembled and their command set parsed directly; outgoing status-only
    C-STORE-RSPs are encoded directly. Every other message, and anything unexpected, goes through
    pynetdicom's own code.
    """

    def __init__(self, assoc: Any) -> None:
        super().__init__(assoc)
        self._cmd = bytearray()
        self._rq: C_STORE | None = None
        self._data: BytesIO | None = None
        self._delegating = False

    def receive_primitive(self, primitive: Any) -> None:
        if _config.STORE_RECV_CHUNKED_DATASET or not isinstance(primitive, P_DATA):
            super().receive_primitive(primitive)
            return
        for context_id, data in primitive.presentation_data_value_list:
            if self._delegating:
                self._delegate(context_id, data)
                continue
            header, payload = data[0], data[1:]
            if header & 1:  # command fragment
                self._cmd += payload
                if header & 2:
                    rq = _decode_store_rq(bytes(self._cmd))
                    if rq is None:  # not a C-STORE-RQ with a data set: pynetdicom takes over
                        command, self._cmd = bytes(self._cmd), bytearray()
                        self._delegating = True
                        self._delegate(context_id, b"\x03" + command)
                        continue
                    self._cmd = bytearray()
                    self._rq, self._data = rq, BytesIO()
            elif self._rq is not None and self._data is not None:  # data set fragment
                self._data.write(payload)
                if header & 2:
                    self._rq.DataSet = self._data
                    self.msg_queue.put((context_id, self._rq))
                    self._rq, self._data = None, None
            else:  # a data set fragment without a command: let pynetdicom handle the error
                self._delegating = True
                self._delegate(context_id, data)

    def _delegate(self, context_id: int, data: bytes) -> None:
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, data))
        super().receive_primitive(pdata)
        if self.message is None:  # pynetdicom finished that message
            self._delegating = False

    def send_msg(self, primitive: Any, context_id: int) -> None:
        command = _encode_store_rsp(primitive)
        max_pdu = self.maximum_pdu_size
        if command is not None and (not max_pdu or len(command) + 1 <= max_pdu - 6):
            pdata = P_DATA()
            pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
            self.dul.send_pdu(pdata)
            return
        super().send_msg(primitive, context_id)


def _decode_store_rq(command: bytes) -> C_STORE | None:
    """A C-STORE-RQ primitive (without its data set) from an Implicit VR LE command set, or None when
    the command is something else or anything about it is unexpected.
    """
    fields: dict[int, bytes] = {}
    pos, end = 0, len(command)
    while pos + 8 <= end:
        group = int.from_bytes(command[pos:pos + 2], "little")
        elem = int.from_bytes(command[pos + 2:pos + 4], "little")
        length = int.from_bytes(command[pos + 4:pos + 8], "little")
        if group != 0 or pos + 8 + length > end:
            return None
        fields[elem] = command[pos + 8:pos + 8 + length]
        pos += 8 + length
    if pos != end:
        return None

    def us(elem: int) -> int | None:
        raw = fields.get(elem)
        return int.from_bytes(raw, "little") if raw is not None and len(raw) == 2 else None

    def text(elem: int) -> str | None:
        raw = fields.get(elem)
        return raw.decode("ascii").rstrip("\x00 ") if raw is not None else None

    if us(0x0100) != 0x0001 or us(0x0800) in (None, 0x0101):  # C-STORE-RQ carrying a data set
        return None
    try:
        rq = C_STORE()
        rq.MessageID = us(0x0110)
        rq.AffectedSOPClassUID = text(0x0002)
        rq.AffectedSOPInstanceUID = text(0x1000)
        rq.Priority = us(0x0700) if us(0x0700) is not None else 2
        if 0x1030 in fields:
            rq.MoveOriginatorApplicationEntityTitle = text(0x1030)
        if 0x1031 in fields:
            rq.MoveOriginatorMessageID = us(0x1031)
    except (ValueError, TypeError, UnicodeDecodeError):
        return None
    if rq.MessageID is None or not rq.AffectedSOPClassUID or not rq.AffectedSOPInstanceUID:
        return None
    return rq


def _encode_store_rsp(primitive: Any) -> bytes | None:
    """The Implicit VR LE command set of a status-only C-STORE-RSP (PS3.7 9.3.1.2), or None."""
    if not (
        isinstance(primitive, C_STORE)
        and primitive.MessageIDBeingRespondedTo is not None
        and primitive.Status is not None
        and primitive.ErrorComment is None
        and primitive.OffendingElement is None
    ):
        return None
    body = b"".join((
        _ui(0x0002, str(primitive.AffectedSOPClassUID)) if primitive.AffectedSOPClassUID else b"",
        _us(0x0100, 0x8001),  # Command Field: C-STORE-RSP
        _us(0x0120, int(primitive.MessageIDBeingRespondedTo)),
        _us(0x0800, 0x0101),  # Command Data Set Type: no data set
        _us(0x0900, int(primitive.Status)),
        _ui(0x1000, str(primitive.AffectedSOPInstanceUID)) if primitive.AffectedSOPInstanceUID else b"",
    ))
    return b"\x00\x00\x00\x00\x04\x00\x00\x00" + len(body).to_bytes(4, "little") + body


class _FastAssociation(Association):
    def __init__(self, ae: Any, mode: str) -> None:
        super().__init__(ae, mode)
        self.dul = _FastDUL(self)
        self.dimse = _FastDIMSE(self)

    def _run_reactor(self) -> None:  # pynetdicom 3.0.4 Association._run_reactor, waits changed
        self._is_paused = False
        while not self._kill:
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            try:
                context_id, msg = self.dimse.msg_queue.get(block=True, timeout=_IDLE_WAIT)
            except queue.Empty:
                context_id, msg = None, None
            if msg:
                self._serve_request(msg, cast(int, context_id))
            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                logger.warning("Network timeout reached; aborting association")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


class _FastSocket(AssociationSocket):
    def recv(self, nr_bytes: int) -> bytearray:
        """Read exactly ``nr_bytes`` (fewer only when the peer closes) into one buffer, in large reads."""
        sock = cast(socket.socket, self.socket)
        out = bytearray(nr_bytes)
        view = memoryview(out)
        got = 0
        while got < nr_bytes:
            n = sock.recv_into(view[got:], nr_bytes - got)
            if not n:
                del view
                del out[got:]
                return out
            got += n
        return out


class _FastRequestHandler(RequestHandler):
    def _create_association(self) -> Any:  # pynetdicom 3.0.4 RequestHandler._create_association
        from datetime import datetime

        assoc = _FastAssociation(self.ae, MODE_ACCEPTOR)
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        sock = _FastSocket(assoc, client_socket=self.request)
        assoc.set_socket(sock)
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        # Negotiation only reads the supported contexts (pynetdicom 3.0 presentation.negotiate_as_acceptor),
        # so share them instead of deep-copying ~6000 transfer syntax entries per association.
        assoc.acceptor.supported_contexts = list(self.server.contexts)
        assoc.requestor.address_info = self.remote
        for event in self.server._handlers:
            if event.is_intervention and self.server._handlers[event]:
                assoc.bind(event, *self.server._handlers[event])
            elif isinstance(event, evt.NotificationEvent):
                for handler in self.server._handlers[event]:
                    assoc.bind(event, handler[0], handler[1])
        return assoc


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
    ConfigurationError
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
        raise ConfigurationError(f"DICOM TLS files cannot be loaded (cert '{cert}', key '{key}', ca '{ca}'): {exc}") from exc
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
        ConfigurationError
            When TLS is required but no certificate is configured, or TLS files cannot be loaded.
        OSError
            When a port cannot be bound.
        """
        d = self.settings.dimse
        # pynetdicom logs whole identifier data sets at some levels: never do that here.
        _config.LOG_REQUEST_IDENTIFIERS = False
        _config.LOG_RESPONSE_IDENTIFIERS = False
        # No per-PDU/per-message logging handlers: they cost time on every C-STORE and can dump data sets.
        _config.LOG_HANDLER_LEVEL = "none"
        _config.UNRESTRICTED_STORAGE_SERVICE = d.accept_unknown_sop_classes
        tls = ssl_server_context(d.tls_cert, d.tls_key, d.tls_ca) if d.tls_cert else None
        if d.require_tls and tls is None:
            raise ConfigurationError("dimse.require_tls is set but dimse.tls_cert is empty.")
        listeners: list[tuple[int, ssl.SSLContext | None]] = []
        if tls is not None and d.require_tls:
            listeners.append((d.port, tls))
        else:
            listeners.append((d.port, None))
            if tls is not None:
                listeners.append((d.tls_port, tls))
        addresses = []
        for port, ctx in listeners:
            server = self.ae.make_server(
                (d.host, port), ae_title=d.ae_title, ssl_context=ctx, evt_handlers=self.handlers(),
                server_class=_NodeServer,
            )
            server.handshake_timeout = d.acse_timeout
            if _FAST_OK:
                server.RequestHandlerClass = _FastRequestHandler
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
