"""The persisted outbox: retries with backoff across restarts, exactly one delivery, refusals, routing rules."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import peers
from config.settings import DestinationSettings, RouteSettings, Settings
from dicom_io.scu import Peer, send_instances
from dicom_io.store import KIND_RESULT, Store
from node import status
from node.outbox import DELIVERED, FAILED, PENDING, Outbox

DATA = Path(__import__("data_store").__file__).parent / "data"
SEG_FILE = DATA / "liver.dcm"  # a real Segmentation Storage instance
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture
def recorder() -> Iterator[peers.RecorderSCP]:
    rec = peers.RecorderSCP()
    yield rec
    rec.stop()


def _settings(tmp_path: Path, rec: peers.RecorderSCP, **kw: Any) -> Settings:
    base = peers.node_settings(tmp_path / "node")
    dest = DestinationSettings(ae_title=rec.ae_title, host="127.0.0.1", port=rec.port, timeout=3)
    return dataclasses.replace(base, destinations={"PEER": dest}, **kw)


def test_retry_across_restart_then_exactly_once(tmp_path: Path, recorder: peers.RecorderSCP) -> None:
    settings = _settings(tmp_path, recorder)
    store = Store.open(settings.store_path)
    put = store.put_file(SEG_FILE, kind=KIND_RESULT)
    outbox = Outbox(tmp_path / "outbox.sqlite", settings, store)
    assert outbox.enqueue(put.sop_instance_uid, put.path, ["PEER"])
    t0 = time.time()
    assert outbox.deliver_due() == {DELIVERED: 0, FAILED: 0, PENDING: 1}  # peer is down
    e1 = outbox.entry(put.sop_instance_uid, "PEER")
    assert e1 is not None and e1.state == PENDING and e1.attempts == 1 and e1.last_status is None and e1.last_error
    assert e1.next_attempt >= t0 + settings.outbox.retry_base_seconds
    assert outbox.deliver_due() == {DELIVERED: 0, FAILED: 0, PENDING: 0}  # not due yet: backoff
    outbox.deliver_due(now=e1.next_attempt + 0.01)
    e2 = outbox.entry(put.sop_instance_uid, "PEER")
    assert e2 is not None and e2.attempts == 2 and e2.next_attempt - e1.next_attempt >= 0.19  # doubled
    # Retention may not delete it meanwhile.
    assert store.apply_retention(max_bytes=1).deleted == 0
    outbox.close()

    # "Restart": a new outbox on the same file still has the row; the peer comes up.
    recorder.start()
    outbox = Outbox(tmp_path / "outbox.sqlite", settings, store)
    assert outbox.deliver_due(now=time.time() + 3600)[DELIVERED] == 1
    e3 = outbox.entry(put.sop_instance_uid, "PEER")
    assert e3 is not None and e3.state == DELIVERED and e3.last_status == status.SUCCESS
    assert recorder.counts == {put.sop_instance_uid: 1}
    assert recorder.sop_classes[put.sop_instance_uid] == SEG_STORAGE
    # Queuing it again is a no-op; nothing is sent twice.
    assert outbox.enqueue(put.sop_instance_uid, put.path, ["PEER"]) == []
    outbox.deliver_due(now=time.time() + 7200)
    assert recorder.counts == {put.sop_instance_uid: 1}
    # Delivered: the hold is gone and the result may now be removed by retention.
    assert store.instance(put.sop_instance_uid).delivered_at is not None
    assert store.apply_retention(max_bytes=1).deleted == 1
    outbox.close()
    store.close()


def test_refusals_transient_and_permanent(tmp_path: Path, recorder: peers.RecorderSCP) -> None:
    settings = _settings(tmp_path, recorder)
    series = peers.make_ct_series(tmp_path / "ct", n=3, rows=8, cols=8)
    recorder.refuse = {series.sop_uids[0]: status.OUT_OF_RESOURCES, series.sop_uids[1]: status.CANNOT_UNDERSTAND}
    recorder.start()
    outbox = Outbox(tmp_path / "outbox.sqlite", settings)
    for p, uid in zip(series.paths, series.sop_uids, strict=True):
        outbox.enqueue(uid, p, ["PEER"])
    outbox.enqueue(series.sop_uids[2], series.paths[2], ["NOWHERE"])
    counts = outbox.deliver_due()
    assert counts == {DELIVERED: 1, FAILED: 2, PENDING: 1}
    states = {(e.sop_instance_uid, e.destination): (e.state, e.last_status) for e in outbox.entries()}
    assert states[(series.sop_uids[0], "PEER")] == (PENDING, status.OUT_OF_RESOURCES)
    assert states[(series.sop_uids[1], "PEER")] == (FAILED, status.CANNOT_UNDERSTAND)
    assert states[(series.sop_uids[2], "PEER")] == (DELIVERED, status.SUCCESS)
    assert states[(series.sop_uids[2], "NOWHERE")][0] == FAILED
    # After the cause is fixed, failed rows can be retried.
    recorder.refuse = {}
    assert outbox.retry_failed("PEER") == 1
    outbox.deliver_due(now=time.time() + 60)
    assert outbox.entry(series.sop_uids[1], "PEER").state == DELIVERED
    assert outbox.entry(series.sop_uids[0], "PEER").state == DELIVERED
    assert all(n == 1 for n in recorder.counts.values())
    outbox.close()


def test_worker_delivers_after_outage_across_node_restart(
    tmp_path: Path, recorder: peers.RecorderSCP, start_node: Any
) -> None:
    settings = _settings(tmp_path, recorder)
    node = start_node(settings)
    put = node.store.put_file(SEG_FILE, kind=KIND_RESULT)
    node.outbox.enqueue(put.sop_instance_uid, put.path, ["PEER"])
    assert peers.wait_until(lambda: node.outbox.entry(put.sop_instance_uid, "PEER").attempts >= 2, timeout=10)
    node.service.stop()  # the node goes down with the result still queued

    recorder.start()
    node2 = start_node(settings)
    assert peers.wait_until(lambda: node2.outbox.entry(put.sop_instance_uid, "PEER").state == DELIVERED, timeout=15)
    assert recorder.counts == {put.sop_instance_uid: 1}


def test_routing_rule_forwards_stable_series(tmp_path: Path, recorder: peers.RecorderSCP, start_node: Any) -> None:
    settings = _settings(tmp_path, recorder, routes={
        "ct": RouteSettings(modality="CT", destinations=("PEER",)),
        "mr": RouteSettings(modality="MR", destinations=("NOWHERE",)),
    })
    recorder.start()
    node = start_node(settings)
    series = peers.make_ct_series(tmp_path / "ct", n=4, rows=8, cols=8)
    results = send_instances(Peer("AINODE", "127.0.0.1", node.port, calling_ae_title="MODALITY"), series.paths)
    assert all(r.status == status.SUCCESS for r in results)
    assert peers.wait_until(lambda: len(recorder.counts) == 4, timeout=15)
    assert recorder.counts == {uid: 1 for uid in series.sop_uids}
    assert {e.destination for e in node.outbox.entries()} == {"PEER"}


def test_archive_destination_goes_through_the_same_retries(tmp_path: Path) -> None:
    """A DICOMweb destination that is down: the row stays pending with the archive's error, no exception."""
    base = peers.node_settings(tmp_path / "node")
    dest = DestinationSettings(kind="dicomweb", url=f"http://127.0.0.1:{peers.free_port()}/dicom-web", timeout=3)
    settings = dataclasses.replace(base, destinations={"WEB": dest})
    store = Store.open(settings.store_path)
    put = store.put_file(SEG_FILE, kind=KIND_RESULT)
    outbox = Outbox(tmp_path / "outbox.sqlite", settings, store)
    outbox.enqueue(put.sop_instance_uid, put.path, ["WEB"])
    assert outbox.deliver_due() == {DELIVERED: 0, FAILED: 0, PENDING: 1}
    e = outbox.entry(put.sop_instance_uid, "WEB")
    assert e is not None and e.state == PENDING and e.last_status is None and e.last_error
    outbox.close()
    store.close()


def test_a_claim_left_by_a_crashed_attempt_is_released_at_start(tmp_path: Path,
                                                                recorder: peers.RecorderSCP) -> None:
    settings = _settings(tmp_path, recorder)
    store = Store.open(settings.store_path)
    put = store.put_file(SEG_FILE, kind=KIND_RESULT)
    outbox = Outbox(tmp_path / "outbox.sqlite", settings, store)
    assert outbox.enqueue(put.sop_instance_uid, put.path, ["PEER"])
    # An attempt claims the row and the process dies before it records the outcome (kill -9).
    now = time.time()
    with outbox._lock:
        outbox._db.execute("UPDATE outbox SET next_attempt=?", (now + outbox._claim_seconds(),))
    outbox.close()
    recorder.start()
    restarted = Outbox(tmp_path / "outbox.sqlite", settings, store)
    assert restarted.deliver_due() == {DELIVERED: 0, FAILED: 0, PENDING: 0}  # still claimed: not due
    assert restarted.release_claims() == 1
    assert restarted.deliver_due() == {DELIVERED: 1, FAILED: 0, PENDING: 0}, restarted.entries()
    assert recorder.counts == {put.sop_instance_uid: 1}
    # A retry scheduled by backoff (never later than retry_max_seconds) is not a claim: left alone.
    put2 = store.put_file(DATA / "MR2_UNCI.dcm", kind=KIND_RESULT)
    assert restarted.enqueue(put2.sop_instance_uid, put2.path, ["PEER"])
    with restarted._lock:
        restarted._db.execute("UPDATE outbox SET next_attempt=? WHERE sop_instance_uid=?",
                              (time.time() + settings.outbox.retry_max_seconds - 1, put2.sop_instance_uid))
    assert restarted.release_claims() == 0
    restarted.close()
    store.close()
