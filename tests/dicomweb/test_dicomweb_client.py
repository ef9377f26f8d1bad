"""The DICOMweb client against a real Orthanc with its DICOMweb plugin: pull into the store, STOW-RS a SEG."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pydicom
import pytest

import peers
from dicom_io.dicomweb import DicomwebClient, DicomwebError, first_value, make_auth
from dicom_io.phantom import write_phantom_series
from dicom_io.store import Store
from dw_helpers import AUTH_PASSWORD, AUTH_USER, orthanc_call, upload


def _client(proc: peers.Proc, **kw: object) -> DicomwebClient:
    return DicomwebClient(f"http://127.0.0.1:{proc.http_port}/dicom-web", name="orthanc", **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def series_in_orthanc(orthanc_dw: peers.Proc, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    ph = write_phantom_series(tmp_path_factory.mktemp("ph"), shape=(12, 64, 64))
    upload(orthanc_dw, ph.paths)
    return ph


def test_pull_series_streams_into_the_store(orthanc_dw: peers.Proc, series_in_orthanc, tmp_path: Path) -> None:
    ph = series_in_orthanc
    store = Store.open(tmp_path / "store", durable=True)
    seen: list[tuple[int, int | None]] = []
    with _client(orthanc_dw) as client:
        result = client.pull_series(store, ph.study_instance_uid, ph.series_instance_uid,
                                    progress=lambda done, total: seen.append((done, total)))
    assert result.complete and not result.error, result
    assert (result.expected, result.stored, result.duplicates) == (12, 12, 0)
    held = store.instances(ph.series_instance_uid)
    assert len(held) == 12 and all(r.calling_ae_title == "orthanc" for r in held)
    assert seen[-1] == (12, 12)
    # Byte-identical to what Orthanc holds (original transfer syntax, no transcoding).
    sent = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p).PixelData for p in ph.paths}
    for rec in held:
        ds = pydicom.dcmread(rec.path)
        assert ds.PixelData == sent[ds.SOPInstanceUID]
    assert not list((store.root / "spool").iterdir())
    store.close()


def test_pull_is_idempotent_and_completes_a_partial_series(orthanc_dw: peers.Proc, series_in_orthanc,
                                                           tmp_path: Path) -> None:
    ph = series_in_orthanc
    store = Store.open(tmp_path / "store")
    with _client(orthanc_dw) as client:
        assert client.pull_series(store, ph.study_instance_uid, ph.series_instance_uid).stored == 12
        again = client.pull_series(store, ph.study_instance_uid, ph.series_instance_uid)
        assert again.skipped and again.stored == 0 and again.duplicates == 12
        # Lose four instances: the next pull fetches exactly those four, one request each.
        gone = store.instances(ph.series_instance_uid)[:4]
        for rec in gone:
            rec.path.unlink()
        store.recover()
        assert len(store.instances(ph.series_instance_uid)) == 8
        partial = client.pull_series(store, ph.study_instance_uid, ph.series_instance_uid)
    assert partial.complete and (partial.stored, partial.duplicates) == (4, 8)
    assert {r.sop_instance_uid for r in gone} <= {r.sop_instance_uid for r in store.instances(ph.series_instance_uid)}
    store.close()


def test_pull_of_an_unknown_series_reports_an_error(orthanc_dw: peers.Proc, tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store")
    with _client(orthanc_dw) as client:
        result = client.pull_series(store, "1.2.3.4", "1.2.3.4.5")
    assert result.error and not result.complete and result.stored == 0
    store.close()


def test_pull_from_a_down_archive_returns_an_error(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store")
    with DicomwebClient(f"http://127.0.0.1:{peers.free_port()}/dicom-web", timeout=2) as client:
        result = client.pull_series(store, "1.2.3", "1.2.3.4")
        with pytest.raises(DicomwebError):
            client.search_for_studies()
    assert "failed" in result.error and store.count() == 0
    store.close()


def test_qido_searches(orthanc_dw: peers.Proc, series_in_orthanc) -> None:
    ph = series_in_orthanc
    with _client(orthanc_dw) as client:
        studies = client.search_for_studies({"StudyInstanceUID": ph.study_instance_uid})
        assert [first_value(s, "0020000D") for s in studies] == [ph.study_instance_uid]
        series = client.search_for_series(ph.study_instance_uid, fields=("00201209",))
        assert first_value(series[0], "00201209") == 12
        page = client.search_for_instances(ph.study_instance_uid, ph.series_instance_uid, limit=5, offset=10)
        assert len(page) == 2
        meta = client.retrieve_series_metadata(ph.study_instance_uid, ph.series_instance_uid)
        assert len(meta) == 12


def _seg_like(tmp_path: Path, ph_paths: list[Path]) -> Path:
    """A new instance in the phantom's study (a stand-in result; the SEG writer is tested elsewhere)."""
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(ph_paths[0])
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesNumber = 9901
    out = tmp_path / "result.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out


def test_store_instances_and_see_them_in_qido(orthanc_dw: peers.Proc, series_in_orthanc, tmp_path: Path) -> None:
    ph = series_in_orthanc
    result_file = _seg_like(tmp_path, ph.paths)
    ds = pydicom.dcmread(result_file)
    with _client(orthanc_dw) as client:
        results = client.store_instances([result_file])
        assert [(r.sop_instance_uid, r.status) for r in results] == [(ds.SOPInstanceUID, 0)]
        found = client.search_for_series(ph.study_instance_uid, {"SeriesInstanceUID": ds.SeriesInstanceUID})
        assert len(found) == 1
        # Sending to a study URL of another study is refused per instance, not raised.
        refused = client.store_instances([result_file], study_instance_uid="1.2.3.999")
    assert refused[0].status not in (0, None), refused


def test_real_seg_round_trip(orthanc_dw: peers.Proc, tmp_path: Path) -> None:
    """A SEG made by dicom_io.seg from a pulled series goes back into the same archive."""
    import numpy as np

    from dicom_io import seg as segmod
    from dicom_io.series import load_series

    ph = write_phantom_series(tmp_path / "ph", shape=(6, 32, 32), seed=3)
    upload(orthanc_dw, ph.paths)
    store = Store.open(tmp_path / "store")
    with _client(orthanc_dw) as client:
        assert client.pull_series(store, ph.study_instance_uid, ph.series_instance_uid).complete
        series = load_series(store.series_paths(ph.series_instance_uid))
        mask = np.zeros(series.voxels.shape, dtype=bool)
        mask[2:4, 10:20, 10:20] = True
        seg = segmod.build_seg(mask, series, segmod.SegmentSpec(label="Lesion"),
                               segmod.AlgorithmSpec(name="test", version="0"))
        seg_path = segmod.write_seg(seg, tmp_path / "seg.dcm")
        results = client.store_instances([seg_path])
        assert results[0].status == 0, results
        segs = client.search_for_series(ph.study_instance_uid, {"Modality": "SEG"})
    assert len(segs) == 1
    store.close()


def test_basic_auth(orthanc_auth: peers.Proc, tmp_path: Path) -> None:
    ph = write_phantom_series(tmp_path / "ph", shape=(4, 32, 32), seed=1)
    upload(orthanc_auth, ph.paths, users={AUTH_USER: AUTH_PASSWORD})
    store = Store.open(tmp_path / "store")
    with _client(orthanc_auth) as anonymous:
        with pytest.raises(DicomwebError) as info:
            anonymous.search_for_studies()
        assert info.value.status == 401
        assert anonymous.store_instances([ph.paths[0]])[0].status == 0x0124
    with _client(orthanc_auth, auth=make_auth("basic", AUTH_USER, AUTH_PASSWORD)) as client:
        result = client.pull_series(store, ph.study_instance_uid, ph.series_instance_uid)
        assert result.complete and result.stored == 4
        out = _seg_like(tmp_path, ph.paths)
        assert client.store_instances([out])[0].status == 0
    with pytest.raises(urllib.error.HTTPError):
        orthanc_call(orthanc_auth, "GET", "/dicom-web/studies")
    store.close()


def test_make_auth_rejects_unknown_kinds() -> None:
    with pytest.raises(ValueError, match='"digest"'):
        make_auth("digest")
    with pytest.raises(ValueError, match="username"):
        make_auth("basic")
    assert "tok" not in repr(make_auth("bearer", token="tok"))


def test_a_large_multiframe_instance_spills_to_disk(orthanc_dw: peers.Proc, tmp_path: Path) -> None:
    """An instance bigger than the in-memory limit is spooled to a file while it arrives, then stored."""
    ph = write_phantom_series(tmp_path / "mf", shape=(30, 256, 256), multiframe=True, seed=31)
    upload(orthanc_dw, ph.paths)
    store = Store.open(tmp_path / "store")
    with _client(orthanc_dw, spool_bytes=1024 * 1024) as client:  # the 3.9 MB instance must spill
        result = client.pull_series(store, ph.study_instance_uid, ph.series_instance_uid)
    assert result.complete and result.stored == 1, result
    [rec] = store.instances(ph.series_instance_uid)
    assert rec.path.read_bytes() == ph.paths[0].read_bytes() or pydicom.dcmread(rec.path).PixelData == \
        pydicom.dcmread(ph.paths[0]).PixelData
    assert not list((store.root / "spool").iterdir())
    store.close()


def test_a_pull_keeps_the_good_instances_and_refuses_damaged_or_foreign_parts(tmp_path: Path) -> None:
    """A WADO-RS answer holding, among good instances, a truncated one and one of another series (served
    by a small local HTTP server: Orthanc never sends such parts): the good ones are stored and indexed,
    each bad part is reported failed, no temp file is left, and progress ends at the stored count."""
    import http.server
    import json
    import threading

    from dicom_io.multipart import encode_files

    good = write_phantom_series(tmp_path / "good", shape=(5, 32, 32))
    other = write_phantom_series(tmp_path / "other", shape=(1, 32, 32))
    damaged = tmp_path / "damaged.dcm"
    data = good.paths[0].read_bytes()
    ds = pydicom.dcmread(good.paths[0])
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.99999"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(damaged)
    data = damaged.read_bytes()
    damaged.write_bytes(data[: len(data) - 700] + b"\xff" * 8)  # pixel data element cut short
    parts = [good.paths[0], good.paths[1], damaged, good.paths[2], other.paths[0], good.paths[3], good.paths[4]]
    boundary = "ainode-test-boundary"
    length, chunks = encode_files(parts, boundary)
    body = b"".join(chunks)
    study, series = good.study_instance_uid, good.series_instance_uid

    class Archive(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path.startswith(f"/studies/{study}/series?"):
                out = json.dumps([{"0020000E": {"vr": "UI", "Value": [series]},
                                   "00201209": {"vr": "IS", "Value": [7]}}]).encode()
                ctype = "application/dicom+json"
            elif self.path == f"/studies/{study}/series/{series}":
                out, ctype = body, f'multipart/related; type="application/dicom"; boundary={boundary}'
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Archive)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    store = Store.open(tmp_path / "store", durable=True)
    seen: list[tuple[int, int | None]] = []
    try:
        with DicomwebClient(f"http://127.0.0.1:{server.server_address[1]}", name="fake") as client:
            result = client.pull_series(store, study, series, progress=lambda d, t: seen.append((d, t)))
    finally:
        server.shutdown()
        server.server_close()
    assert (result.stored, result.expected) == (5, 7) and not result.complete
    assert sorted(result.failed) == ["part 3", "part 5"], result.failed
    assert "not " + series in result.failed["part 5"]
    assert ({r.sop_instance_uid for r in store.instances(series)}
            == {pydicom.dcmread(p).SOPInstanceUID for p in good.paths})
    assert seen[-1] == (5, 7)
    assert not [p for p in store.root.rglob("*.partial")] and not list((store.root / "spool").iterdir())
    store.close()


def test_clients_share_one_verifying_tls_context() -> None:
    """Building the default TLS context reads the CA bundle (tens of ms); every client used to build its own."""
    import ssl

    from dicom_io.dicomweb import default_tls_context

    ctx = default_tls_context()
    assert ctx is default_tls_context()
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    with DicomwebClient("https://archive.invalid/dicom-web") as a, DicomwebClient("http://127.0.0.1:9/x") as b:
        pools = [c._http._transport._pool for c in (a, b)]  # httpcore's pool keeps the context it was given
        assert all(p._ssl_context is ctx for p in pools)
    with DicomwebClient("https://archive.invalid/dicom-web", verify=False) as c:
        assert c._http._transport._pool._ssl_context is not ctx


class _Wado:
    """A local WADO-RS answer for one series (the test's own HTTP server): Content-Length, chunked
    (as dcm4chee sends it) or cut short; it records each request's headers."""

    def __init__(self, tmp_path: Path, mode: str) -> None:
        import http.server
        import threading

        from dicom_io.multipart import encode_files

        self.series = write_phantom_series(tmp_path / "wado", shape=(4, 32, 32))
        _, chunks = encode_files(self.series.paths, "bnd")
        body = b"".join(chunks)
        self.requests: list[dict[str, str]] = []
        wado = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                wado.requests.append({k.lower(): v for k, v in self.headers.items()})
                self.send_response(200)
                self.send_header("Content-Type", 'multipart/related; type="application/dicom"; boundary=bnd')
                if mode == "chunked":
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for i in range(0, len(body), 7777):
                        piece = body[i:i + 7777]
                        self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                    self.wfile.write(b"0\r\n\r\n")
                else:
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body if mode == "length" else body[: len(body) // 2])
                    if mode == "cut":
                        self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("mode", ["length", "chunked", "cut"])
def test_series_retrieval_reads_length_chunked_and_cut_answers(mode: str, tmp_path: Path) -> None:
    """Whole series are read with the standard library's HTTP client (into the parser's buffers): the same
    request as httpx (client headers, authentication), either framing, a truncated body an error."""
    from dicom_io.dicomweb import make_auth
    from dicom_io.multipart import SpooledPart

    wado = _Wado(tmp_path, mode)
    got: list[bytes] = []

    def keep(part: SpooledPart) -> None:
        got.append(part.read())
        part.discard()

    try:
        with DicomwebClient(wado.url, auth=make_auth("bearer", token="s3cret"), headers={"X-Site": "ward 7"}) as c:
            if mode == "cut":
                with pytest.raises(DicomwebError, match="failed|truncated"):
                    c.retrieve_series(wado.series.study_instance_uid, wado.series.series_instance_uid, keep)
                return
            n = c.retrieve_series(wado.series.study_instance_uid, wado.series.series_instance_uid, keep)
    finally:
        wado.close()
    assert n == 4 and got == [p.read_bytes() for p in wado.series.paths]
    (req,) = wado.requests
    assert req["authorization"] == "Bearer s3cret" and req["x-site"] == "ward 7"
    assert req["accept-encoding"] == "identity" and "application/dicom" in req["accept"]


def test_series_retrieval_goes_through_a_configured_proxy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a proxy in the environment (httpx honours it), the series is fetched through httpx and so
    through the proxy: here a dead one, so the pull fails; exempted by NO_PROXY, it is read directly."""
    wado = _Wado(tmp_path, "length")
    study, series = wado.series.study_instance_uid, wado.series.series_instance_uid
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    try:
        with DicomwebClient(wado.url) as c, pytest.raises(DicomwebError, match="failed"):
            c.retrieve_series(study, series, lambda part: part.discard())
        assert wado.requests == []
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        with DicomwebClient(wado.url) as c:
            assert c.retrieve_series(study, series, lambda part: part.discard()) == 4
        assert len(wado.requests) == 1 and wado.requests[0]["accept-encoding"] == "identity"  # read directly
    finally:
        wado.close()
