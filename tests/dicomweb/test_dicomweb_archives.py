"""Named archives from the settings: pull with origin tracking, results back to where the series came from."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

import peers
from config.settings import ConfigError, DestinationSettings, Secret, Settings
from dicom_io.dicomweb import DicomwebClient, first_value
from dicom_io.phantom import write_phantom_series
from dicom_io.store import Store
from dw_helpers import AUTH_PASSWORD, AUTH_USER, upload
from fake_xnat import FakeXnat
from node.app import HttpServer
from node.archives import (
    Origins,
    pull_dicomweb,
    pull_xnat,
    pull_xnat_by_uid,
    result_destinations,
    send_to_destination,
)


def _settings(tmp_path: Path, **destinations: DestinationSettings) -> Settings:
    return Settings(data_dir=str(tmp_path / "data"), destinations=destinations)


def _result_file(src: Path, out: Path) -> Path:
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(src)
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(out, enforce_file_format=True)
    return out


def test_pull_records_the_origin_and_results_go_back(orthanc_auth: peers.Proc, tmp_path: Path) -> None:
    ph = write_phantom_series(tmp_path / "ph", shape=(4, 32, 32), seed=21)
    upload(orthanc_auth, ph.paths, users={AUTH_USER: AUTH_PASSWORD})
    settings = _settings(tmp_path, pacs=DestinationSettings(
        kind="dicomweb", url=f"http://127.0.0.1:{orthanc_auth.http_port}", qido_prefix="dicom-web",
        wado_prefix="dicom-web", stow_prefix="dicom-web", auth="basic", username=AUTH_USER,
        password=Secret(AUTH_PASSWORD), timeout=10))
    assert AUTH_PASSWORD not in repr(settings)
    store = Store.open(tmp_path / "store")
    origins = Origins.for_settings(settings)
    result = pull_dicomweb(settings, store, "pacs", ph.study_instance_uid, ph.series_instance_uid, origins=origins)
    assert result.complete and result.stored == 4
    assert result_destinations(settings, ph.series_instance_uid, origins) == ["pacs"]
    assert result_destinations(settings, "1.2.3", origins) == []
    out = _result_file(ph.paths[0], tmp_path / "res.dcm")
    [delivered] = send_to_destination("pacs", settings, [out])
    assert delivered.status == 0, delivered
    with DicomwebClient.from_settings("pacs", settings.destinations["pacs"]) as client:
        found = client.search_for_series(ph.study_instance_uid)
    assert len(found) == 2 and {first_value(s, "00201209") for s in found} == {4, 1}
    origins.close()
    store.close()


def test_configuration_errors(tmp_path: Path) -> None:
    settings = _settings(tmp_path, odd=DestinationSettings(kind="ftp"), web=DestinationSettings(kind="dicomweb"))
    with pytest.raises(ConfigError, match="kind 'ftp'"):
        send_to_destination("odd", settings, [])
    with pytest.raises(ConfigError, match="must start with http"):
        send_to_destination("web", settings, [])
    with pytest.raises(ConfigError, match="not configured"):
        send_to_destination("nope", settings, [])


def test_xnat_archive_pull_and_seg_back_into_the_same_session(tmp_path: Path) -> None:
    fake = FakeXnat({"u": "p"}, roi_plugin=False)
    server = HttpServer(fake, "127.0.0.1", peers.free_port())
    server.start()
    try:
        ph = write_phantom_series(tmp_path / "ph", shape=(3, 16, 16), seed=4)
        exp = fake.add_session("P1", "S1", "E1", ph.study_instance_uid)
        fake.add_scan(exp, "7", ph.paths)
        settings = _settings(tmp_path, xn=DestinationSettings(
            kind="xnat", url=f"http://127.0.0.1:{server.port}", username="u", password=Secret("p"), project="P1"))
        store = Store.open(tmp_path / "store")
        origins = Origins.for_settings(settings)
        result = pull_xnat(settings, store, "xn", "E1", "7", origins=origins)
        assert result.complete and result.stored == 3
        origin = origins.of_series(ph.series_instance_uid)
        assert origin is not None and (origin.xnat_session, origin.xnat_scan) == (exp.id, "7")
        assert result_destinations(settings, ph.series_instance_uid, origins) == ["xn"]
        out = _result_file(ph.paths[0], tmp_path / "res.dcm")
        [delivered] = send_to_destination("xn", settings, [out], origins=origins)
        assert delivered.status == 0, delivered
        assert fake.imports and fake.imports[0][0].endswith(f"/experiments/{exp.id}")
        assert pull_xnat(settings, store, "xn", "NOPE", "7").error
        by_uid = pull_xnat_by_uid(settings, store, "xn", ph.study_instance_uid, ph.series_instance_uid)
        assert by_uid.complete and by_uid.duplicates == 3 and (by_uid.session, by_uid.scan) == (exp.id, "7")
        assert "no scan" in pull_xnat_by_uid(settings, store, "xn", ph.study_instance_uid, "1.2.3").error
        origins.close()
        store.close()
    finally:
        server.stop()


def test_results_of_a_pushed_series_go_back_to_the_sender_destination(tmp_path: Path) -> None:
    """A series received from a peer whose calling AE title names a destination goes back there."""
    ph = write_phantom_series(tmp_path / "ph", shape=(2, 16, 16), seed=41)
    store = Store.open(tmp_path / "store")
    for p in ph.paths:
        store.put_file(p, kind="received", calling_ae_title="PACS1")
    settings = _settings(tmp_path, PACS1=DestinationSettings(ae_title="PACS1", host="127.0.0.1", port=104))
    assert result_destinations(settings, ph.series_instance_uid, None, store) == ["PACS1"]
    configured = Settings(data_dir=str(tmp_path / "data"), deliver_to=("PACS1",),
                          destinations={"PACS1": DestinationSettings(), "other": DestinationSettings()})
    assert result_destinations(configured, ph.series_instance_uid, None, store) == ["PACS1"]
    assert result_destinations(_settings(tmp_path), ph.series_instance_uid, None, store) == []
    store.close()
