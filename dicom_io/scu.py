"""DIMSE client: C-ECHO and C-STORE to a peer, returning per-instance statuses (never raising on refusal)."""

from __future__ import annotations

import logging
import os
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_io import pynetdicom_speedups as speedups
from dicom_io.pynetdicom_speedups import Checkpoint, pause_reactor

logger = logging.getLogger(__name__)

#: Largest number of presentation contexts in one A-ASSOCIATE-RQ (PS3.8 9.3.2.2: odd IDs 1..255).
MAX_CONTEXTS = 128

_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


@dataclass(frozen=True)
class Peer:
    """A DIMSE peer: called AE title, host, port, and how to reach it.

    Parameters
    ----------
    ae_title, host, port
        The peer's called AE title and address.
    calling_ae_title
        Our AE title towards it.
    tls
        A client :class:`ssl.SSLContext` for DICOM TLS, or None.
    timeout
        Seconds allowed for connecting, negotiation and each response.
    """

    ae_title: str
    host: str
    port: int
    calling_ae_title: str = "AINODE"
    tls: ssl.SSLContext | None = field(default=None, compare=False)
    server_hostname: str | None = None
    timeout: float = 30.0
    max_pdu: int = 0

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}{' (TLS)' if self.tls else ''}"

    @classmethod
    def parse(cls, text: str, calling_ae_title: str = "AINODE") -> Peer:
        """Parse ``AE@host:port``.

        Raises
        ------
        ValueError
            When ``text`` is not of that form.
        """
        ae, sep, rest = text.partition("@")
        host, colon, port = rest.rpartition(":")
        if not (sep and colon and ae and host and port.isdigit()):
            raise ValueError(f'Peer "{text}" is not of the form AE@host:port.')
        return cls(ae_title=ae, host=host, port=int(port), calling_ae_title=calling_ae_title)


def client_tls_context(ca: str = "", cert: str = "", key: str = "") -> ssl.SSLContext:
    """A client TLS context verifying the peer against ``ca`` (system store when empty), with an optional
    client certificate.
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert:
        ctx.load_cert_chain(cert, key or None)
    return ctx


@dataclass(frozen=True)
class StoreResult:
    """The outcome of one C-STORE.

    ``status`` is the peer's (0000,0900) Status, or None when no response was received (not sent,
    association rejected/aborted, timeout); ``error`` then says why.
    """

    source: str
    sop_instance_uid: str
    sop_class_uid: str
    status: int | None
    error: str = ""

    @property
    def ok(self) -> bool:
        """True for success or a warning (the peer holds the instance)."""
        return self.status is not None and (self.status == 0 or 0xB000 <= self.status <= 0xBFFF
                                            or self.status in (0x0001, 0x0107, 0x0116))


@dataclass(frozen=True)
class EchoResult:
    status: int | None
    error: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == 0


@dataclass
class _Item:
    source: str
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    transfer_syntax: str = ""
    path: Path | None = None
    offset: int = 0
    dataset: Dataset | None = None
    error: str = ""


def _prepare(item: str | os.PathLike[str] | Dataset) -> _Item:
    """Work out how to send ``item`` without decoding its pixel data."""
    if isinstance(item, Dataset):
        ts = str(getattr(getattr(item, "file_meta", None), "TransferSyntaxUID", "") or ExplicitVRLittleEndian)
        return _Item(source=f"<dataset {item.get('SOPInstanceUID', '?')}>",
                     sop_class_uid=str(item.get("SOPClassUID", "")),
                     sop_instance_uid=str(item.get("SOPInstanceUID", "")),
                     transfer_syntax=ts, dataset=item)
    path = Path(item)
    out = _Item(source=str(path), path=path)
    try:
        from pynetdicom.dsutils import split_dataset

        meta, offset = split_dataset(path)
        cls, inst, ts = (meta.get(k) for k in
                         ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID"))
        if cls and inst and ts:
            out.sop_class_uid, out.sop_instance_uid, out.transfer_syntax = str(cls), str(inst), str(ts)
            out.offset = offset
            return out
    except Exception:
        pass
    # No usable file meta: read the data set (Part 10 without meta, or a bare data set).
    try:
        ds = dcmread(path, force=True)
        implicit, little = ds.original_encoding
        ts = ImplicitVRLittleEndian if implicit or implicit is None else (
            ExplicitVRLittleEndian if little else UID("1.2.840.10008.1.2.2"))
        ds.file_meta.TransferSyntaxUID = ts
        out.sop_class_uid = str(ds.get("SOPClassUID", ""))
        out.sop_instance_uid = str(ds.get("SOPInstanceUID", ""))
        out.transfer_syntax = str(ts)
        out.dataset, out.path = ds, None
        if not (out.sop_class_uid and out.sop_instance_uid):
            out.error = "not sent: no SOP Class/Instance UID in the file"
    except Exception as exc:
        out.error = f"not sent: cannot read file ({type(exc).__name__}: {exc})"
    return out


def _contexts(items: Sequence[_Item]) -> list[tuple[str, list[str]]]:
    """Presentation contexts: (SOP class, [stored transfer syntax]) per file, uncompressed ones for data sets."""
    seen: dict[tuple[str, tuple[str, ...]], None] = {}
    for it in items:
        if it.error:
            continue
        if it.dataset is not None:
            # pynetdicom encodes data sets itself and can convert between uncompressed syntaxes.
            seen[(it.sop_class_uid, tuple(str(t) for t in _UNCOMPRESSED))] = None
        else:
            # Files go as stored: the context must carry exactly their transfer syntax.
            seen[(it.sop_class_uid, (it.transfer_syntax,))] = None
    return [(cls, list(ts)) for cls, ts in seen]


def _associate(peer: Peer, contexts: Sequence[tuple[str, Sequence[str]]]) -> tuple[Any, str]:
    from pynetdicom import AE

    speedups.install_socket_close_fix()
    ae = AE(ae_title=peer.calling_ae_title)
    ae.acse_timeout = peer.timeout
    ae.dimse_timeout = peer.timeout
    ae.network_timeout = peer.timeout
    ae.connection_timeout = peer.timeout
    ae.maximum_pdu_size = peer.max_pdu
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, list(syntaxes))
    kwargs: dict[str, Any] = {"ae_title": peer.ae_title, "max_pdu": peer.max_pdu}
    if peer.tls is not None:
        kwargs["tls_args"] = (peer.tls, peer.server_hostname or peer.host)
    try:
        assoc = ae.associate(peer.host, peer.port, **kwargs)
    except Exception as exc:  # socket/TLS errors surface here on some paths
        return None, f"cannot associate with {peer}: {type(exc).__name__}: {exc}"
    if not assoc.is_established:
        rejected = sorted({str(cx.abstract_syntax) for cx in (getattr(assoc, "rejected_contexts", None) or [])})
        if assoc.is_aborted and rejected and not getattr(assoc, "accepted_contexts", None):
            # pynetdicom aborts when the peer accepted none of the proposed presentation contexts (PS3.8 9.3.3.2)
            return None, f"not sent: {peer} accepted no presentation context (SOP class {', '.join(rejected)})"
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
        return None, f"association with {peer} {why}"
    sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
    try:
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
    checkpoint = Checkpoint()
    checkpoint.set()
    assoc._reactor_checkpoint = checkpoint  # the reactor reads the attribute on every loop
    return assoc, ""


def echo(peer: Peer) -> EchoResult:
    """C-ECHO the peer; never raises for a network problem or refusal."""
    # sop_class creates its names at import from pynetdicom's UID tables, out of mypy's sight
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    t0 = time.perf_counter()
    assoc, error = _associate(peer, [(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])])
    if assoc is None:
        return EchoResult(None, error, time.perf_counter() - t0)
    try:
        pause_reactor(assoc)  # send_c_echo's own pause could trust a stale _is_paused
        try:
            rsp = assoc.send_c_echo()
        finally:
            assoc._reactor_checkpoint.set()
        code = int(rsp.Status) if "Status" in rsp else None
        return EchoResult(code, "" if code is not None else "no response", time.perf_counter() - t0)
    finally:
        _close(assoc)


def send_instances(peer: Peer, items: Iterable[str | os.PathLike[str] | Dataset],
                   on_response: Callable[[int, StoreResult], None] | None = None) -> list[StoreResult]:
    """C-STORE files or data sets to ``peer``, one result per item in order.

    ``on_response(index, result)`` is called as each of the peer's answers arrives, before the next
    instance is sent and before the association is released (the outbox commits a delivery there).

    Files are sent as stored (no decoding or re-encoding) in their own transfer syntax; data sets
    are encoded by pynetdicom. Presentation contexts come from the items' SOP classes and transfer
    syntaxes (so a SEG gets its own). More than 128 contexts are spread over several associations.

    Returns
    -------
    list of StoreResult
        ``status`` is the peer's status, or None with ``error`` when the item was not sent or no
        response came back. A peer's refusal is a status, never an exception.
    """
    prepared = [_prepare(i) for i in items]
    results: dict[int, StoreResult] = {}
    for idx, it in enumerate(prepared):
        if it.error:
            results[idx] = StoreResult(it.source, it.sop_instance_uid, it.sop_class_uid, None, it.error)
    pending = [i for i in range(len(prepared)) if i not in results]
    # Batch so that each association needs at most MAX_CONTEXTS contexts.
    batches: list[list[int]] = []
    current: list[int] = []
    for idx in pending:
        trial = [prepared[i] for i in current + [idx]]
        if current and len(_contexts(trial)) > MAX_CONTEXTS:
            batches.append(current)
            current = []
        current.append(idx)
    if current:
        batches.append(current)
    for batch in batches:
        results.update(_send_batch(peer, [(i, prepared[i]) for i in batch], on_response))
    return [results[i] for i in range(len(prepared))]


def _send_batch(peer: Peer, batch: list[tuple[int, _Item]],
                on_response: Callable[[int, StoreResult], None] | None = None) -> dict[int, StoreResult]:
    out: dict[int, StoreResult] = {}
    assoc, error = _associate(peer, _contexts([it for _, it in batch]))
    if assoc is None:
        logger.warning("C-STORE to %s: %s", peer, error)
        return {i: StoreResult(it.source, it.sop_instance_uid, it.sop_class_uid, None, error) for i, it in batch}
    try:
        for msg_id, (idx, it) in enumerate(batch, start=1):
            if not assoc.is_established:
                out[idx] = StoreResult(it.source, it.sop_instance_uid, it.sop_class_uid, None,
                                       "association ended before this instance was sent")
                continue
            try:
                if it.path is not None:
                    rsp = _send_file(assoc, it, msg_id % 65536)
                else:
                    pause_reactor(assoc)  # send_c_store's own pause could trust a stale _is_paused
                    try:
                        rsp = assoc.send_c_store(it.dataset, msg_id=msg_id % 65536)
                    finally:
                        assoc._reactor_checkpoint.set()  # also when it raised before resuming the reactor
            except (ValueError, AttributeError) as exc:  # no accepted context, cannot encode
                out[idx] = StoreResult(it.source, it.sop_instance_uid, it.sop_class_uid, None, f"not sent: {exc}")
                continue
            except (OSError, RuntimeError) as exc:
                out[idx] = StoreResult(it.source, it.sop_instance_uid, it.sop_class_uid, None,
                                       f"connection failed: {exc}")
                continue
            if rsp is not None and "Status" in rsp:
                out[idx] = StoreResult(it.source, it.sop_instance_uid, it.sop_class_uid, int(rsp.Status))
                if on_response is not None:
                    on_response(idx, out[idx])
            else:
                out[idx] = StoreResult(it.source, it.sop_instance_uid, it.sop_class_uid, None,
                                       "no response (timeout or association aborted)")
    finally:
        _close(assoc)
    return out


def _send_file(assoc: Any, it: _Item, msg_id: int) -> Dataset:
    """C-STORE a Part 10 file's data set bytes as stored (pynetdicom's streamed-file path)."""
    from pynetdicom.dimse_primitives import C_STORE

    assert it.path is not None
    context = assoc._get_valid_context(UID(it.sop_class_uid), UID(it.transfer_syntax), "scu",
                                       allow_conversion=False)
    req = C_STORE()
    req.MessageID = msg_id
    req.Priority = 2
    req.AffectedSOPClassUID = it.sop_class_uid
    req.AffectedSOPInstanceUID = it.sop_instance_uid
    req._dataset_path = (it.path, it.offset)
    # As Association.send_c_store does: pause the reactor, send, wait for the response.
    pause_reactor(assoc)
    try:
        assoc.dimse.send_msg(req, context.context_id)
        _cx, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    if rsp is None:
        assoc._handle_no_response()
        return Dataset()
    status: Dataset = assoc._check_received_status(rsp)
    return status


def _close(assoc: Any) -> None:
    """Release (or abort) and make sure our socket is closed, whatever pynetdicom's threads did."""
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    try:
        if assoc.is_established:
            pause_reactor(assoc)  # release() pauses the reactor the same way; it resumes it itself
            assoc.release()
    except Exception:
        assoc.abort()
    finally:
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
