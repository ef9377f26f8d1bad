"""The XNAT client against the fake XNAT (tests/fake_xnat.py) served by real uvicorn on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import peers
from dicom_io import seg as segmod
from dicom_io.phantom import write_phantom_series
from dicom_io.series import load_series
from dicom_io.store import Store
from dicom_io.xnat import XnatClient, XnatError
from fake_xnat import FakeXnat
from node.app import HttpServer

USER, PASSWORD = "researcher", "xnat-pw"


class Served:
    def __init__(self, fake: FakeXnat) -> None:
        self.fake = fake
        self.server = HttpServer(fake, "127.0.0.1", peers.free_port())
        self.server.start()
        self.url = f"http://127.0.0.1:{self.server.port}"


@pytest.fixture
def xnat(tmp_path: Path) -> Iterator[Served]:
    fake = FakeXnat({USER: PASSWORD})
    served = Served(fake)
    yield served
    served.server.stop()


@pytest.fixture
def session_with_scan(xnat: Served, tmp_path: Path):  # type: ignore[no-untyped-def]
    ph = write_phantom_series(tmp_path / "ph", shape=(6, 32, 32), seed=5)
    exp = xnat.fake.add_session("PROJ1", "SUBJ1", "SESS1", ph.study_instance_uid)
    xnat.fake.add_scan(exp, "2", ph.paths)
    return ph, exp


def _seg_for(store: Store, series_uid: str, out: Path) -> Path:
    series = load_series(store.series_paths(series_uid))
    mask = np.zeros(series.voxels.shape, dtype=bool)
    mask[1:3, 8:16, 8:16] = True
    seg = segmod.build_seg(mask, series, segmod.SegmentSpec(label="Lesion"), segmod.AlgorithmSpec("test", "0"))
    return segmod.write_seg(seg, out)


def test_pull_scan_with_jsession_and_push_seg_as_roi_collection(xnat: Served, session_with_scan,
                                                                 tmp_path: Path) -> None:
    ph, exp = session_with_scan
    store = Store.open(tmp_path / "store")
    with XnatClient(xnat.url, USER, PASSWORD, project="PROJ1", name="xnat") as client:
        session = client.get_session("SESS1")  # by label within the project
        assert (session.id, session.subject, session.study_instance_uid) == (exp.id, exp.subject,
                                                                             ph.study_instance_uid)
        assert [s["ID"] for s in client.scans(exp.id)] == ["2"]
        result = client.pull_scan(store, exp.id, "2")
        assert result.complete and result.stored == 6 and result.skipped_files == 1  # the catalog XML
        assert result.series_instance_uids == [ph.series_instance_uid]
        assert all(r.calling_ae_title == "xnat" for r in store.instances(ph.series_instance_uid))
        again = client.pull_scan(store, exp.id, "2")
        assert again.stored == 0 and again.duplicates == 6

        seg = _seg_for(store, ph.series_instance_uid, tmp_path / "seg.dcm")
        results = client.store_instances([seg])  # session found by StudyInstanceUID
        assert results[0].status == 0, results
        assert len(xnat.fake.collections) == 1
        # A retry after a crash (same SEG, same label) is not a second collection.
        assert client.store_instances([seg])[0].status == 0 and len(xnat.fake.collections) == 1
    # One basic-auth login for the whole conversation (then the JSESSIONID cookie), and logged out.
    assert xnat.fake.basic_logins == 1 and not xnat.fake.sessions
    assert not list((store.root / "spool").iterdir())
    store.close()


def test_import_service_fallback_without_roi_plugin(xnat: Served, session_with_scan, tmp_path: Path) -> None:
    ph, exp = session_with_scan
    xnat.fake.roi_plugin = False
    store = Store.open(tmp_path / "store")
    with XnatClient(xnat.url, USER, PASSWORD, project="PROJ1") as client:
        assert client.pull_scan(store, exp.id, "2").complete
        seg = _seg_for(store, ph.series_instance_uid, tmp_path / "seg.dcm")
        result = client.store_seg(seg, client.get_session(exp.id))
    assert result.status == 0, result
    assert not xnat.fake.collections
    dest, names = xnat.fake.imports[0]
    assert dest == f"/archive/projects/PROJ1/subjects/{exp.subject}/experiments/{exp.id}" and names == ["seg.dcm"]
    store.close()


def test_alias_token_csrf_and_errors(xnat: Served, session_with_scan, tmp_path: Path) -> None:
    ph, exp = session_with_scan
    with XnatClient(xnat.url, USER, PASSWORD, project="PROJ1") as client:
        alias, secret = client.issue_token()
    store = Store.open(tmp_path / "store")
    with XnatClient(xnat.url, alias, secret, project="PROJ1") as client:
        assert client.pull_scan(store, exp.id, "2").stored == 6
        missing = client.pull_scan(store, exp.id, "99")
        assert "404" in missing.error and not missing.complete
        with pytest.raises(XnatError) as info:
            client.get_session("NOPE")
        assert info.value.status == 404
        # Without the CSRF token a session-authenticated upload is refused (403 → not authorised).
        client._csrf = "wrong"  # noqa: SLF001 - simulate a stale token
        seg = _seg_for(store, ph.series_instance_uid, tmp_path / "seg.dcm")
        assert client.store_seg(seg, client.get_session(exp.id)).status == 0x0124
    with XnatClient(xnat.url, USER, "wrong") as bad, pytest.raises(XnatError) as info:
        bad.login()
    assert info.value.status == 401
    with XnatClient(xnat.url, USER, PASSWORD) as client, pytest.raises(ValueError, match="valid XNAT identifier"):
        client.download_scan("../etc", "1", tmp_path / "x.zip")
    store.close()


def test_outage_is_a_retryable_result(xnat: Served, session_with_scan, tmp_path: Path) -> None:
    ph, exp = session_with_scan
    store = Store.open(tmp_path / "store")
    with XnatClient(xnat.url, USER, PASSWORD, project="PROJ1") as client:
        client.pull_scan(store, exp.id, "2")
        seg = _seg_for(store, ph.series_instance_uid, tmp_path / "seg.dcm")
        session = client.get_session(exp.id)
        client.roi_collections_available("PROJ1")
        xnat.fake.fail_next = [503]
        assert client.store_seg(seg, session).status is None  # retry later
        assert client.store_seg(seg, session).status == 0
    store.close()


def test_an_existing_jsessionid_is_used_and_not_logged_out(xnat: Served, session_with_scan, tmp_path: Path) -> None:
    from config.settings import DestinationSettings, Secret

    ph, exp = session_with_scan
    with XnatClient(xnat.url, USER, PASSWORD) as login:
        login.login()
        sid = login._http.cookies["JSESSIONID"]  # noqa: SLF001 - the web UI's session, handed over
        dest = DestinationSettings(kind="xnat", url=xnat.url, auth="jsession", token=Secret(sid), project="PROJ1")
        store = Store.open(tmp_path / "store")
        with XnatClient.from_settings("x", dest) as client:
            assert client.pull_scan(store, exp.id, "2").stored == 6
            seg = _seg_for(store, ph.series_instance_uid, tmp_path / "seg.dcm")
            assert client.store_instances([seg])[0].status == 0  # CSRF token fetched for the handed session
        assert sid in xnat.fake.sessions  # not logged out by the node
        assert xnat.fake.basic_logins == 1
        store.close()
    with pytest.raises(ValueError, match="bearer"):
        XnatClient.from_settings("x", DestinationSettings(kind="xnat", url=xnat.url, auth="bearer"))
