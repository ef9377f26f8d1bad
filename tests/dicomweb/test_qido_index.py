"""QIDO-RS from the store's index: matching, paging, computed attributes, query plans, migration, permissions."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

from dicom_io import store as store_mod
from dicom_io.query import Level, parse_search, plan
from dicom_io.store import InstanceInfo, Store, check_encoding, read_file_meta
from node.dicomweb import DicomwebConfig, dicomweb_routes
from qido_data import StudySpec, archive, instance_bytes, study_spec

ROOT = Path(__file__).resolve().parents[2]


def ingest(store: Store, files: list[bytes]) -> None:
    """As the C-STORE SCP does: the structure check and index values from the bytes, then a durable put."""
    for data in files:
        ts, offset = read_file_meta(data)
        store.put(data, InstanceInfo.from_raw(check_encoding(memoryview(data)[offset:], ts), ts))


def client_for(store: Store) -> TestClient:
    app = Starlette(routes=[Mount("/dicomweb", routes=dicomweb_routes(DicomwebConfig(store)))])
    return TestClient(app)


@pytest.fixture(scope="module")
def specs() -> list[StudySpec]:
    return [study_spec(i, series=1 + (i % 3 == 0)) for i in range(40)]


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory, specs: list[StudySpec]) -> Iterator[Store]:
    store = Store(tmp_path_factory.mktemp("qido") / "store", durable=False)
    for spec in specs:
        ingest(store, [instance_bytes(spec, k) for k in range(len(spec.modalities))])
    yield store
    store.close()


def _uids(rsp: list[dict], tag: str = "0020000D") -> set[str]:  # type: ignore[type-arg]
    return {item[tag]["Value"][0] for item in rsp}


def test_matching_semantics(filled: Store, specs: list[StudySpec]) -> None:
    c = client_for(filled)

    def studies(**params: str) -> set[str]:
        r = c.get("/dicomweb/studies", params=params)
        assert r.status_code == 200, r.text
        return _uids(r.json())

    def want(pred) -> set[str]:  # type: ignore[no-untyped-def]
        return {s.study_uid for s in specs if pred(s)}

    assert studies() == want(lambda s: True)
    # Person names: wildcards, case-insensitive (PS3.4 C.2.2.2.1 allows it; Orthanc does the same).
    assert studies(PatientName="smith*") == want(lambda s: s.patient_name.lower().startswith("smith"))
    assert studies(PatientName="SMITH^JOHN") == want(lambda s: s.patient_name.lower() == "smith^john")
    assert studies(PatientName="?oe*") == want(lambda s: s.patient_name.lower().startswith("doe"))
    assert studies(PatientName="*") == want(lambda s: True)  # "*" alone is universal matching
    assert studies(PatientName="") == want(lambda s: True)
    assert studies(PatientName="müller*") == want(lambda s: s.patient_name.startswith("Müller"))
    # Single values, case-sensitive.
    assert studies(PatientID="PID000007") == want(lambda s: s.patient_id == "PID000007")
    assert studies(PatientID="pid000007") == set()
    assert studies(AccessionNumber="ACC000001*") == want(lambda s: s.accession.startswith("ACC000001"))
    assert studies(StudyDescription="Study 3 *") == want(lambda s: s.description.startswith("Study 3 "))
    assert studies(ReferringPhysicianName="ref^smith") == want(lambda s: s.referring.lower() == "ref^smith")
    # UID lists, comma or backslash separated.
    three = [specs[1].study_uid, specs[5].study_uid, "1.2.3.999"]
    assert studies(StudyInstanceUID=",".join(three)) == set(three[:2])
    assert studies(StudyInstanceUID="\\".join(three)) == set(three[:2])
    # Date and time ranges, open at either end; empty values never match a range.
    assert studies(StudyDate="20200101-20201231") == want(lambda s: "20200101" <= s.study_date <= "20201231")
    assert studies(StudyDate="-20160101") == want(lambda s: s.study_date <= "20160101")
    assert studies(StudyDate="20230101-") == want(lambda s: s.study_date >= "20230101")
    assert studies(StudyDate=specs[3].study_date) == want(lambda s: s.study_date == specs[3].study_date)
    assert studies(StudyTime="080000-120000") == want(lambda s: "080000" <= s.study_time <= "120000")
    # ModalitiesInStudy: any series; a list is OR.
    assert studies(ModalitiesInStudy="MR") == want(lambda s: "MR" in s.modalities)
    assert studies(ModalitiesInStudy="MR,US") == want(lambda s: {"MR", "US"} & set(s.modalities))
    # Several keys: AND.
    assert studies(ModalitiesInStudy="CT", StudyDate="20180101-") == want(
        lambda s: "CT" in s.modalities and s.study_date >= "20180101")
    # Series- and instance-level keys.
    r = c.get("/dicomweb/series", params={"Modality": "MR"}).json()
    assert _uids(r, "0020000E") == {s.series_uid(k) for s in specs for k, m in enumerate(s.modalities) if m == "MR"}
    r = c.get("/dicomweb/series", params={"SeriesNumber": "2", "PatientID": specs[3].patient_id}).json()
    assert _uids(r, "0020000E") == {specs[3].series_uid(1)}
    r = c.get("/dicomweb/instances", params={"SOPClassUID": "1.2.840.10008.5.1.4.1.1.4"}).json()
    assert len(r) == sum(m == "MR" for s in specs for m in s.modalities)
    # A key the index does not hold is matched against the stored header (slower, same answer).
    assert studies(PatientBirthDate="19700101") == want(lambda s: True)
    r = c.get("/dicomweb/studies", params={"PhotometricInterpretation": "MONOCHROME2", "limit": "3"})
    assert r.status_code == 200 and len(r.json()) == 3 and "additional results" in r.headers["warning"]
    assert r.json()[0]["00280004"]["Value"] == ["MONOCHROME2"]  # the matching key is returned
    assert studies(Manufacturer="*") == want(lambda s: True)  # universal there too (no such attribute held)
    assert studies(Manufacturer="x*") == set()
    assert studies(PhotometricInterpretation="MONOCHROME1") == set()


def test_answers_paging_and_computed_attributes(filled: Store, specs: list[StudySpec]) -> None:
    c = client_for(filled)
    everything = c.get("/dicomweb/studies").json()
    # Newest first (the order of arrival), paged in SQL; the Warning says more are left.
    assert [s["0020000D"]["Value"][0] for s in everything] == [s.study_uid for s in reversed(specs)]
    page = c.get("/dicomweb/studies", params={"limit": "5", "offset": "10"})
    assert page.json() == everything[10:15] and "additional results" in page.headers["warning"]
    last = c.get("/dicomweb/studies", params={"limit": "5", "offset": "35"})
    assert last.json() == everything[35:] and "warning" not in last.headers
    assert c.get("/dicomweb/studies", params={"limit": "x"}).status_code == 400
    assert c.get("/dicomweb/studies", params={"offset": "-1"}).status_code == 400
    # fuzzymatching=true is answered with literal matching and says so (PS3.18 8.3.4.1).
    fuzzy = c.get("/dicomweb/studies", params={"fuzzymatching": "true", "PatientName": "doe*"})
    assert "fuzzymatching" in fuzzy.headers["warning"] and len(fuzzy.json()) > 0
    spec = specs[3]  # two series
    [item] = c.get("/dicomweb/studies", params={"StudyInstanceUID": spec.study_uid}).json()
    assert item["00201206"]["Value"] == [2] and item["00201208"]["Value"] == [2]
    assert item["00080061"]["Value"] == sorted(set(spec.modalities))
    assert item["00100020"]["Value"] == [spec.patient_id] and item["00080050"] == (
        {"vr": "SH", "Value": [spec.accession]} if spec.accession else {"vr": "SH"})
    # includefield: kept series attributes (OHIF asks for Modality), then anything from the header.
    [item] = c.get("/dicomweb/studies", params={"StudyInstanceUID": spec.study_uid,
                                                "includefield": "00080060,PhotometricInterpretation"}).json()
    assert item["00080060"]["Value"] == [spec.modalities[0]] and item["00280004"]["Value"] == ["MONOCHROME2"]
    [item] = c.get("/dicomweb/studies", params={"StudyInstanceUID": spec.study_uid, "includefield": "all"}).json()
    assert item["00280100"]["Value"] == [16] and "7FE00010" not in item
    series = c.get(f"/dicomweb/studies/{spec.study_uid}/series").json()
    assert {s["0020000E"]["Value"][0] for s in series} == {spec.series_uid(0), spec.series_uid(1)}
    assert all(s["00201209"]["Value"] == [1] and s["00100020"]["Value"] == [spec.patient_id] for s in series)
    [inst] = c.get(f"/dicomweb/studies/{spec.study_uid}/series/{spec.series_uid(0)}/instances").json()
    assert inst["00280010"]["Value"] == [2] and inst["00280100"]["Value"] == [16]
    assert inst["00200013"]["Value"] == [1] and inst["00083002"]["Value"] == ["1.2.840.10008.1.2.1"]
    assert c.get("/dicomweb/studies/1.2.3.4/series").status_code == 404


def test_counts_follow_every_change(tmp_path: Path) -> None:
    """NumberOfStudyRelated*, ModalitiesInStudy are kept by triggers: ingest, duplicates, re-ingest, retention."""
    store = Store(tmp_path / "store", durable=False)
    spec = study_spec(3, series=2)
    files = [instance_bytes(spec, k, j) for k in range(2) for j in range(3)]
    ingest(store, files)
    ingest(store, files[:2])  # duplicates: nothing counted twice

    def counts() -> tuple[int, int, str, list[int]]:
        row = store.select("SELECT num_series, num_instances, modalities FROM studies")[0]
        per = [r[0] for r in store.select("SELECT num_instances FROM series ORDER BY series_instance_uid")]
        return row[0], row[1], row[2], per

    assert counts() == (2, 6, "\\".join(sorted(set(spec.modalities))), [3, 3])
    # A file lost and the instance stored again: its row is replaced, not counted again.
    one = store.instances(spec.series_uid(0))[0]
    one.path.unlink()
    ingest(store, files[:1])
    assert counts()[:2] == (2, 6)
    # Retention deletes the oldest series: counts and modalities follow.
    store._db.execute("UPDATE instances SET received_at = 0 WHERE series_instance_uid = ?", (spec.series_uid(0),))
    store.apply_retention(max_age_seconds=3600)
    assert counts() == (1, 3, spec.modalities[1], [3])
    store.close()


def test_query_plans_use_the_indexes(filled: Store) -> None:
    def plan_of(level: Level, params: dict[str, str], **kw: str) -> str:
        p = plan(parse_search(level, list(params.items()), **kw))
        return "\n".join(r[3] for r in filled.select("EXPLAIN QUERY PLAN " + p.sql, p.args))

    listing = plan_of(Level.STUDY, {"limit": "25"})
    assert "USING INDEX studies_received" in listing and "TEMP B-TREE" not in listing, listing
    for key, value, index in (("PatientID", "PID000001", "studies_patient_id"),
                              ("PatientName", "smi*", "studies_patient_name"),
                              ("StudyDate", "20200101-20200131", "studies_date"),
                              ("AccessionNumber", "ACC0000001", "studies_accession"),
                              ("StudyInstanceUID", "1.2.3,1.2.4", "sqlite_autoindex_studies_1")):
        text = plan_of(Level.STUDY, {key: value, "limit": "25"})
        assert f"USING INDEX {index}" in text and "SCAN st" not in text, (key, text)
    series = plan_of(Level.SERIES, {}, study_uid="1.2.3")
    assert "USING INDEX series_study" in series and "SCAN se" not in series, series
    instances = plan_of(Level.INSTANCE, {}, study_uid="1.2.3", series_uid="1.2.3.4")
    assert "USING INDEX instances_series" in instances and "SCAN i " not in instances + " ", instances
    listing = plan_of(Level.SERIES, {"limit": "25"})
    assert "USING INDEX series_received" in listing and "TEMP B-TREE" not in listing, listing
    # OHIF's study list (includefield=StudyDescription,Modality) is answered from the index, no file read.
    ohif = plan(parse_search(Level.STUDY, [("limit", "101"), ("includefield", "00081030,00080060")]))
    assert "header_path" not in ohif.sql and ohif.first_series_attrs
    # ModalitiesInStudy: a lookup per study through the series' study index, never a scan of all series.
    mods = plan_of(Level.STUDY, {"ModalitiesInStudy": "MR", "limit": "25"})
    assert "SCAN mx" not in mods and "series_study" in mods, mods


def _make_version0(store_dir: Path) -> None:
    """Turn an index into what a store made before version 1 holds: the version-0 tables and columns only."""
    db_path = store_dir / "index.sqlite"
    old = sqlite3.connect(db_path)
    tables = {}
    for table in ("instances", "series", "studies", "holds"):
        cols = [r[1] for r in old.execute(f"PRAGMA table_info({table})")]
        tables[table] = (cols, old.execute(f"SELECT * FROM {table}").fetchall())
    old.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    db = sqlite3.connect(db_path)
    db.executescript(store_mod._SCHEMA)
    for table, (cols, rows) in tables.items():
        keep = [r[1] for r in db.execute(f"PRAGMA table_info({table})")]
        idx = [cols.index(c) for c in keep]
        db.executemany(f"INSERT INTO {table} ({','.join(keep)}) VALUES ({','.join('?' * len(keep))})",
                       [tuple(row[i] for i in idx) for row in rows])
    db.commit()
    db.close()


def _answers(store: Store) -> dict[str, object]:
    c = client_for(store)
    out: dict[str, object] = {}
    for path, params in (("/studies", {}), ("/studies", {"PatientName": "smith*"}),
                         ("/studies", {"StudyDate": "20190101-20211231", "limit": "7"}), ("/series", {}),
                         ("/instances", {}), ("/studies", {"ModalitiesInStudy": "MR"})):
        out[path + json.dumps(params)] = sorted(json.dumps(x, sort_keys=True) for x in c.get("/dicomweb" + path,
                                                                                          params=params).json())
    return out


def test_migration_from_version_0_resumes_after_a_crash(tmp_path: Path, specs: list[StudySpec],
                                                      filled: Store, caplog: pytest.LogCaptureFixture) -> None:
    """An index of a store made before version 1 is migrated when opened; killed part way, nothing is lost and
    the next open finishes it. The answers then equal those of a store that was version 1 all along."""
    root = tmp_path / "store"
    store = Store(root, durable=False)
    for spec in specs:
        ingest(store, [instance_bytes(spec, k) for k in range(len(spec.modalities))])
    # Same arrival times as the reference store, so that the order of the answers is the same.
    times = {r[0]: r[1] for r in filled.select("SELECT sop_instance_uid, received_at FROM instances")}
    with store._lock:
        for uid, when in times.items():
            store._db.execute("UPDATE instances SET received_at=? WHERE sop_instance_uid=?", (when, uid))
        for table, key in (("series", "series_instance_uid"), ("studies", "study_instance_uid")):
            for uid, first, last in filled.select(
                    f"SELECT {key}, {'first_received' if table == 'series' else 'last_received'}, last_received "
                    f"FROM {table}"):
                cols = "first_received=?, last_received=?" if table == "series" else "last_received=?, last_received=?"
                store._db.execute(f"UPDATE {table} SET {cols} WHERE {key}=?", (first, last, uid))
    store.close()
    _make_version0(root)
    before = sqlite3.connect(root / "index.sqlite").execute("SELECT COUNT(*) FROM instances").fetchone()[0]

    # A process that dies (SIGKILL-like os._exit) after reading the headers of 5 series, 2 per transaction.
    crash = f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
from dicom_io import store as s
from dicom_io.query import IndexedAttributes
s._MIGRATION_BATCH = 2
real = IndexedAttributes.from_file.__func__
calls = [0]
def reading(cls, path):
    calls[0] += 1
    if calls[0] > 5:
        os._exit(9)
    return real(cls, path)
IndexedAttributes.from_file = classmethod(reading)
s.Store({str(root)!r}, durable=False)
"""
    rc = subprocess.run([sys.executable, "-c", crash], env={**os.environ, "PYTHONPATH": str(ROOT)},
                        timeout=120).returncode
    assert rc == 9
    db = sqlite3.connect(root / "index.sqlite")
    assert db.execute("PRAGMA user_version").fetchone()[0] == 0
    filled_now = db.execute("SELECT COUNT(*) FROM series WHERE attrs IS NOT NULL").fetchone()[0]
    assert filled_now == 4  # two committed batches of two; the third died before its commit
    assert db.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == before
    db.close()

    caplog.set_level(logging.INFO, logger="dicom_io.store")
    store = Store(root, durable=False)
    try:
        assert store.select("PRAGMA user_version")[0][0] == store_mod.INDEX_VERSION
        assert store.select("SELECT COUNT(*) FROM series WHERE attrs IS NULL")[0][0] == 0
        assert store.count() == before
        assert _answers(store) == _answers(filled)
        # Patient identifiers stay out of the log (UIDs are fine).
        text = caplog.text
        assert "Index migration" in text
        assert not any(s.patient_id in text or (s.patient_name and s.patient_name in text) for s in specs)
    finally:
        store.close()


def test_index_files_are_owner_only(tmp_path: Path) -> None:
    """The index holds patient names and IDs: index.sqlite and its WAL files are 0600 whatever the umask, and an
    index made before is tightened when opened."""
    old = os.umask(0o002)
    try:
        store = Store(tmp_path / "store", durable=False)
        ingest(store, [instance_bytes(study_spec(1), 0)])
        files = [tmp_path / "store" / n for n in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm")]
        assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files if f.exists())
        assert files[1].exists()
        store.close()
        for f in files:
            if f.exists():
                f.chmod(0o664)
        Store(tmp_path / "store", durable=False).close()
        assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files if f.exists())
    finally:
        os.umask(old)


def test_a_search_does_not_wait_for_indexing(tmp_path: Path) -> None:
    """Searches run on a connection of their own: a writer holding the store's lock and a write transaction
    (WAL) does not hold them up."""
    import threading

    store = Store(tmp_path / "store", durable=False)
    ingest(store, [instance_bytes(study_spec(i), 0) for i in range(3)])
    answers: list[int] = []
    with store._lock:
        store._db.execute("BEGIN IMMEDIATE")
        try:
            worker = threading.Thread(target=lambda: answers.append(len(client_for(store).get(
                "/dicomweb/studies").json())))
            worker.start()
            worker.join(timeout=60)
            assert not worker.is_alive() and answers == [3]
        finally:
            store._db.execute("ROLLBACK")
    store.close()


def test_archive_helper_is_deterministic() -> None:
    a = [spec for spec, _ in archive(0, 3)]
    assert a == [study_spec(i) for i in range(3)]


@pytest.mark.parametrize("variant", ["plain", "latin1-default", "iso-ir-100", "padded", "empty", "integers",
                                     "multi-valued", "name-groups", "iso2022"])
def test_kept_attributes_from_the_bytes_equal_pydicom(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the index keeps is read from the raw bytes at ingest (no pydicom); it must equal pydicom's reading, or
    be left to pydicom (None) where the fast reading does not apply."""
    import io

    from pydicom import config, dcmread
    from pydicom.dataelem import DataElement

    from dicom_io.query import IndexedAttributes

    monkeypatch.setattr(config.settings, "writing_validation_mode", config.IGNORE)
    monkeypatch.setattr(config.settings, "reading_validation_mode", config.IGNORE)
    ds = dcmread(io.BytesIO(instance_bytes(study_spec(3), 0)))
    values: dict[str, tuple[str, object]] = {
        "plain": {},
        "latin1-default": {"SpecificCharacterSet": ("CS", None), "PatientName": ("PN", "Jörg^Müller")},
        "iso-ir-100": {"SpecificCharacterSet": ("CS", "ISO_IR 100"), "InstitutionName": ("LO", "Hôpital")},
        "padded": {"StudyDescription": ("LO", " lead and trail  "), "PatientID": ("LO", "X1\x00"),
                   "BodyPartExamined": ("CS", "CHEST ")},
        "empty": {"AccessionNumber": ("SH", ""), "PatientName": ("PN", ""), "SeriesNumber": ("IS", "")},
        "integers": {"SeriesNumber": ("IS", " +3 ")},
        "multi-valued": {"StudyDescription": ("LO", "a\\b")},
        "name-groups": {"PatientName": ("PN", "Yamada^Tarou=YAMADA^TAROU")},
        "iso2022": {"SpecificCharacterSet": ("CS", ["", "ISO 2022 IR 87"]), "PatientName": ("PN", "Yamada^Tarou"),
                    "ReferringPhysicianName": ("PN", "Ref^Lee")},
    }[variant]  # type: ignore[assignment]
    for kw, (vr, value) in values.items():
        if value is None:
            del ds[kw]
        else:
            ds[kw] = DataElement(kw, vr, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    ts, offset = read_file_meta(data)
    info = InstanceInfo.from_raw(check_encoding(memoryview(data)[offset:], ts), ts)
    assert info.kept is not None
    fast = IndexedAttributes.from_raw(info.kept)
    slow = IndexedAttributes.from_dataset(dcmread(io.BytesIO(data), stop_before_pixels=True))
    if variant in ("multi-valued", "name-groups", "iso2022"):
        assert fast is None
        return
    assert fast is not None
    assert json.loads(fast.study_json) == json.loads(slow.study_json)
    assert json.loads(fast.series_json) == json.loads(slow.series_json)
    assert fast.study_columns == slow.study_columns and fast.series_columns == slow.series_columns


@pytest.mark.parametrize("recent", [3, 8, 1000])
def test_pages_of_broad_searches_equal_slices_of_the_whole_answer(filled: Store, recent: int,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A limited search on wildcards/ranges is first tried among the newest studies; whether the page is found
    there or through the indexes, it is the same slice of the unlimited answer."""
    from dicom_io import query

    monkeypatch.setattr(query, "RECENT_STUDIES", recent)
    c = client_for(filled)
    for params in ({"PatientName": "smith*"}, {"StudyDate": "20170101-"}, {"ModalitiesInStudy": "CT,MR"},
                   {"PatientName": "doe*", "StudyDate": "-20200101"}):
        whole = c.get("/dicomweb/studies", params=params).json()
        for limit, offset in ((1, 0), (3, 0), (3, 2), (5, 4), (50, 0)):
            r = c.get("/dicomweb/studies", params={**params, "limit": str(limit), "offset": str(offset)})
            assert r.json() == whole[offset:offset + limit], (params, limit, offset)
            assert ("warning" in r.headers) == (len(whole) > offset + limit)
    p = plan(parse_search(Level.STUDY, [("PatientName", "smi*"), ("limit", "25")]))
    assert p.recent_sql is not None and "USING INDEX studies_received" in "\n".join(
        r[3] for r in filled.select("EXPLAIN QUERY PLAN " + p.recent_sql, p.recent_args))
    assert plan(parse_search(Level.STUDY, [("PatientID", "PID000001"), ("limit", "25")])).recent_sql is None
