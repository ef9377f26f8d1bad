"""Speed-ups and fixes of pynetdicom internals, active only with the exact pynetdicom version they copy.

Everything here reaches into pynetdicom's private classes (its DUL, DIMSE and association reactors, its
acceptor's request handler, its transport socket), so it is written against one release,
:data:`PINNED_VERSION`, the version ``pyproject.toml`` and ``requirements/runtime.txt`` pin. With any other
version :data:`ACTIVE` is False and the node and the client run on pynetdicom's stock classes (slower,
still correct). Moving the pin means re-reading the copied loops against the new release.

What each part works around upstream (github.com/pydicom/pynetdicom):

* :class:`FastRequestHandler` and the reactors it builds (acceptor side, used by ``node/scp.py``):
  pynetdicom's DUL and association reactors poll, sleeping between looks at the socket and at the DIMSE
  queue (issues #120, #650; the proposed fixes, PRs #139 and #651, shorten or skip the sleep instead of
  waiting on the socket). The copies of pynetdicom 3.0.4's loops here wait on the socket, a wake-up pipe
  or the DIMSE queue, so a hand-off is immediate (~3 ms per C-STORE otherwise). The same handler shares
  the acceptor's supported contexts instead of deep-copying them per association (negotiation only reads
  them; pynetdicom's own issue #16 calls that negotiation slow), and :class:`_FastDIMSE` parses C-STORE-RQ
  and encodes status-only C-STORE-RSP command sets directly instead of through pydicom data sets
  (~0.3 ms each; no upstream issue).
* :class:`Checkpoint` and :func:`pause_reactor` (requestor side, used by ``dicom_io/scu.py``): the
  reactor checkpoint pynetdicom added for a send/reactor race (PR #351; issue #435) still lets a sender
  trust a stale ``_is_paused`` flag; counting the reactor's waits closes that window.
* :func:`install_socket_close_fix`: ``AssociationSocket._shutdown_socket`` (added by PR #999 for issue
  #979, sockets left open after an abort) calls ``shutdown()`` and ``close()`` in one ``try``, so a
  socket that never connected (``shutdown()`` raises ENOTCONN) is never closed. No upstream issue
  tracks that remaining leak.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import socket
import ssl
import threading
import time
from datetime import datetime
from io import BytesIO
from typing import Any, cast

import pynetdicom
from pynetdicom import _config, evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler

logger = logging.getLogger(__name__)

#: The pynetdicom release whose internals this module copies and patches.
PINNED_VERSION = "3.0.4"
#: True when the installed pynetdicom is :data:`PINNED_VERSION`: only then are the speed-ups used.
ACTIVE = pynetdicom.__version__ == PINNED_VERSION
#: Longest wait of an idle reactor before it re-checks its timers and kill flag (seconds).
_IDLE_WAIT = 0.01


def log_inactive() -> None:
    """Log once, at start-up, when the installed pynetdicom is not the pinned one (stock classes are used)."""
    if not ACTIVE:
        logger.warning("pynetdicom %s is not the pinned %s: its stock (slower) DIMSE loops are used",
                       pynetdicom.__version__, PINNED_VERSION)


# --- acceptor: event-driven reactors --------------------------------------------------------------


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
                        if self.socket is not None:
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
                    rq = decode_store_rq(bytes(self._cmd))
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
        command = encode_store_rsp(primitive)
        max_pdu = self.maximum_pdu_size
        if command is not None and (not max_pdu or len(command) + 1 <= max_pdu - 6):
            pdata = P_DATA()
            pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
            self.dul.send_pdu(pdata)
            return
        super().send_msg(primitive, context_id)


def decode_store_rq(command: bytes) -> C_STORE | None:
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
        priority = us(0x0700)
        rq.Priority = priority if priority is not None else 2
        if 0x1030 in fields:
            rq.MoveOriginatorApplicationEntityTitle = text(0x1030)
        if 0x1031 in fields:
            rq.MoveOriginatorMessageID = us(0x1031)
    except (ValueError, TypeError, UnicodeDecodeError):
        return None
    if rq.MessageID is None or not rq.AffectedSOPClassUID or not rq.AffectedSOPInstanceUID:
        return None
    return rq


def encode_store_rsp(primitive: Any) -> bytes | None:
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


class FastRequestHandler(RequestHandler):
    def _create_association(self) -> Any:  # pynetdicom 3.0.4 RequestHandler._create_association
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
                    handler = cast(evt._HandlerBase, handler)  # as pynetdicom 3.0.4 does
                    assoc.bind(event, handler[0], handler[1])
        return assoc


# --- requestor: reactor pause and socket close ------------------------------------------------------


class Checkpoint(threading.Event):
    """pynetdicom's reactor checkpoint (an Event the reactor waits on), counting the reactor's waits.

    pynetdicom pauses its reactor before a request by clearing the Event and spinning until the
    reactor's ``_is_paused`` flag is True; that flag is set *before* the reactor waits and is still True
    for a moment after a wait has returned, so a sender can trust a stale flag and the reactor then
    takes the peer's response off the queue as unexpected (the sender waits out its timeout). Counting
    waits under a lock closes that window: see :func:`pause_reactor`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Lock()
        self.waits = 0

    def wait(self, timeout: float | None = None) -> bool:
        with self.gate:
            self.waits += 1
        return super().wait(timeout)


def pause_reactor(assoc: Any, timeout: float = 5.0) -> None:
    """Return once the association's reactor is blocked on its checkpoint (it stays so until ``set()``).

    The checkpoint is cleared and the reactor's wait counter read under the same lock, so a wait
    counted after that started after the clear and blocks. A reactor that already passed its
    wait before the clear only polls for an incoming message before it comes round to that wait,
    and nothing has been sent yet that it could take.
    """
    checkpoint = assoc._reactor_checkpoint
    deadline = time.monotonic() + timeout
    if not isinstance(checkpoint, Checkpoint):  # pynetdicom's own protocol
        checkpoint.clear()
        while not assoc._is_paused and assoc.is_alive() and time.monotonic() < deadline:
            time.sleep(0.0001)
        return
    with checkpoint.gate:
        checkpoint.clear()
        seen = checkpoint.waits
    while checkpoint.waits == seen and assoc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.0001)


_SOCKET_FIX_INSTALLED = False


def install_socket_close_fix() -> None:
    """Make ``AssociationSocket._shutdown_socket`` close the socket even when ``shutdown()`` fails.

    Idempotent; does nothing unless :data:`ACTIVE` (the method may differ in another release).
    """
    global _SOCKET_FIX_INSTALLED
    if _SOCKET_FIX_INSTALLED or not ACTIVE:
        return

    def _shutdown_socket(self: AssociationSocket) -> None:
        sock = self.socket
        if sock is None:
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except Exception:
            pass
        try:
            sock.close()
        except Exception:
            pass

    AssociationSocket._shutdown_socket = _shutdown_socket  # type: ignore[method-assign]  # the fix itself
    _SOCKET_FIX_INSTALLED = True
