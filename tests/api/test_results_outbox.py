"""Every result leaves through the store and the persisted outbox, MONAI Label's ``output=dicom_seg`` included."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pydicom

from api_helpers import PhantomSeries, api_settings
from config.settings import DestinationSettings, OutboxSettings


def _settings(data_dir: Path) -> Any:
    s = api_settings(data_dir, destinations={"ARCH": DestinationSettings(
        kind="dicomweb", url="http://127.0.0.1:9/dicom-web", timeout=2.0)})  # nothing listens on port 9
    import dataclasses

    return dataclasses.replace(s, outbox=OutboxSettings(retry_base_seconds=60.0))


def _params(ph: PhantomSeries) -> dict[str, Any]:
    return {"params": (None, json.dumps({"foreground": [[ph.center[0], ph.center[1], ph.k]],
                                         "label_info": [{"name": "lesion"}]}))}


def test_monailabel_dicom_seg_is_stored_and_queued_in_the_outbox(make_api: Any, tmp_path: Path,
                                                                  phantom: PhantomSeries) -> None:
    from node.outbox import Outbox

    settings = _settings(tmp_path / "node")
    outbox = Outbox(tmp_path / "node" / "outbox.sqlite", settings)
    try:
        api = make_api(settings, series=[phantom], outbox=outbox)
        r = api.client.post(f"/infer/sam_2d?image={phantom.series_instance_uid}&output=dicom_seg",
                            files=_params(phantom))
        assert r.status_code == 200, r.text[:300]
        assert r.headers["x-stored-to"] == "ARCH: pending"
        seg = pydicom.dcmread(io.BytesIO(r.content))
        sop = str(seg.SOPInstanceUID)
        # In the store (the node's own DICOMweb server shows it) and in the persisted outbox, nothing sent directly.
        stored = api.store.instance(sop)
        assert stored is not None
        entry = outbox.entry(sop, "ARCH")
        assert entry is not None and entry.state == "pending" and entry.attempts == 0
        assert entry.path.exists() and pydicom.dcmread(entry.path).SOPInstanceUID == sop
        # The outbox's attempt fails (the archive is down) and is kept for a retry, not lost.
        outbox.deliver_due(only_ids=[entry.id])
        entry = outbox.entry(sop, "ARCH")
        assert entry is not None and entry.state == "pending" and entry.attempts == 1 and entry.last_error
        # The upload folder used to write the SEG is gone.
        assert not any(api.ctx.uploads_dir.iterdir())
    finally:
        outbox.close()


def test_without_an_outbox_nothing_is_sent_and_it_says_so(make_api: Any, tmp_path: Path,
                                                          phantom: PhantomSeries) -> None:
    api = make_api(_settings(tmp_path / "node"), series=[phantom])
    r = api.client.post(f"/infer/sam_2d?image={phantom.series_instance_uid}&output=dicom_seg", files=_params(phantom))
    assert r.status_code == 200, r.text[:300]
    assert r.headers["x-stored-to"] == "ARCH: not queued"
    x0, y0, x1, y1 = phantom.box
    r = api.client.post("/v1/segmentations", json={
        "series": phantom.series_instance_uid, "mode": "2d", "destinations": ["ARCH"],
        "prompts": {"boxes": [{"ijk": [[x0, y0, phantom.k], [x1, y1, phantom.k]]}]}})
    assert r.status_code == 201, r.text[:300]
    assert r.json()["deliveries"] == {"ARCH": {"state": "not queued"}}
    assert api.store.instance(r.json()["seg_sop_instance_uid"]) is not None


def test_dicom_seg_label_with_a_control_character_is_422(make_api: Any, tmp_path: Path,
                                                         phantom: PhantomSeries) -> None:
    api = make_api(_settings(tmp_path / "node"), series=[phantom])
    params = {"foreground": [[phantom.center[0], phantom.center[1], phantom.k]], "label_info": [{"name": "a\x00b"}]}
    r = api.client.post(f"/infer/sam_2d?image={phantom.series_instance_uid}&output=dicom_seg",
                        files={"params": (None, json.dumps(params))})
    assert r.status_code == 422 and r.json()["field"] == "params.label_info", r.text[:300]


def test_dicom_seg_colour_that_is_no_number_is_422(make_api: Any, tmp_path: Path, phantom: PhantomSeries) -> None:
    api = make_api(_settings(tmp_path / "node"), series=[phantom])
    for color in ("[Infinity, 0, 0]", "[NaN, 0, 0]", '["red", 0, 0]'):
        params = (f'{{"foreground": [[{phantom.center[0]:f}, {phantom.center[1]:f}, {phantom.k:d}]], '
                  f'"label_info": [{{"name": "x", "color": {color}}}]}}')
        r = api.client.post(f"/infer/sam_2d?image={phantom.series_instance_uid}&output=dicom_seg",
                            files={"params": (None, params)})
        assert r.status_code == 422 and r.json()["field"] == "params.label_info", (color, r.text[:300])
