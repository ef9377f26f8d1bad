"""LiteMedSAM's prompt encoder + mask decoder call (models/decoders.py): the compiled decoder built by the
encoder's background compile thread agrees with eager on phantom and real CT / MR slices, for one box,
batches of candidate boxes of several sizes and the multimask outputs; failures leave eager answering."""

from __future__ import annotations

import logging

import numpy as np
import pydicom
import pytest
import torch
import torch.nn.functional as F
from pydicom.data import get_testdata_file

from config.settings import LiteMedSAMSettings, ModelSettings
from model_test_utils import bbox_prompt_coords, dice, model_input
from models.base import BoxPrompt, Prompts
from models.decoders import BoxDecoder
from models.intensity import IntensityParams, intensity_range, to_uint8
from models.litemedsam import LiteMedSAM


def _slices(phantom) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, uint8 slice, boxes (N, 4) in slice pixels): a phantom slice, real CT and MR slices."""
    params = IntensityParams.from_settings(LiteMedSAMSettings())
    image, a, b = phantom
    ks = np.flatnonzero(a.any(axis=(1, 2)))
    k = int(ks[len(ks) // 2])
    lo, hi = intensity_range(image.array, "CT", params)
    out = [("phantom", to_uint8(image.array[k], lo, hi),
            np.array([bbox_prompt_coords(o[k]) for o in (a, b) if o[k].any()], dtype=np.float32))]
    for name in ("CT_small.dcm", "MR_small.dcm"):
        ds = pydicom.dcmread(get_testdata_file(name))
        arr = ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1))
        arr += float(getattr(ds, "RescaleIntercept", 0))
        lo, hi = intensity_range(arr[None], str(ds.Modality), params)
        h, w = arr.shape
        fr = np.array([(0.35, 0.3, 0.55, 0.5), (0.15, 0.15, 0.85, 0.85), (0.25, 0.45, 0.7, 0.85),
                       (0.05, 0.05, 0.95, 0.95), (0.4, 0.4, 0.6, 0.6)], dtype=np.float32)
        out.append((name, to_uint8(arr, lo, hi), fr * np.array([w, h, w, h], dtype=np.float32)))
    return out


def _embed(model: LiteMedSAM, sl: np.ndarray) -> tuple[torch.Tensor, tuple[int, int], float]:
    """The slice's embedding as the model keeps it (float16 round trip), unpadded (h, w) and scale."""
    x, hw, s = model_input(sl)
    with torch.inference_mode():
        return model._encoder(x).to(torch.float16).float(), hw, s


def _masks(logits: torch.Tensor, hw: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    nh, nw = hw
    up = F.interpolate(logits[..., :nh, :nw], size=shape, mode="bilinear", align_corners=False)
    return (up > 0).numpy()


def _compare_with_eager(model: LiteMedSAM, decoders: list, phantom) -> int:
    """Every decoder call of ``decoders`` against eager: logits, IoU and masks, for one box, the case's boxes as a
    batch, the multimask outputs and a bigger candidate batch on each of :func:`_slices`. Returns the masks compared."""
    eager = BoxDecoder(model._net, torch.device("cpu"))
    n_masks = 0
    for name, sl, boxes in _slices(phantom):
        emb, hw, s = _embed(model, sl)
        b256 = torch.from_numpy(boxes * np.float32(s)).reshape(-1, 1, 4)
        calls = [(b256[i : i + 1], False) for i in range(len(b256))] + [(b256, False), (b256[:1], True)]
        calls.append((torch.cat([b256, b256 + 3.0, b256 - 2.0]), False))  # a bigger candidate batch
        for boxes_in, multimask in calls:
            want_l, want_iou = eager(emb, boxes_in, multimask)
            for decode in decoders:
                got_l, got_iou = decode(emb, boxes_in, multimask)
                assert got_l.shape == want_l.shape and got_iou.shape == want_iou.shape
                assert float((got_l - want_l).abs().max()) < 1e-3, name
                assert float((got_iou - want_iou).abs().max()) < 1e-4, name
                got, want = _masks(got_l, hw, sl.shape), _masks(want_l, hw, sl.shape)
                for g, w in zip(got.reshape(-1, *sl.shape), want.reshape(-1, *sl.shape), strict=True):
                    n_masks += 1
                    assert dice(g, w) >= 0.999 if w.any() else not g.any(), name
    return n_masks


@pytest.mark.slow
def test_the_background_compile_builds_a_decoder_that_matches_eager(phantom, compile_cache_dir, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="models.decoders"):
        model = LiteMedSAM(LiteMedSAMSettings(encoder_backend="compile", encoder_cache_dir=str(compile_cache_dir)),
                           ModelSettings(device="cpu"))
        assert model._decoder.backend == "eager"
        assert model.backends() == {"encoder": "fused (compile: compile starts with the first encode)",
                                    "decoder": "eager"}
        image, a, _ = phantom
        ks = np.flatnonzero(a.any(axis=(1, 2)))
        k = int(ks[len(ks) // 2])
        prompts = Prompts(boxes=(BoxPrompt(*bbox_prompt_coords(a[k]), k=k),))
        before = model.segment(image, prompts, mode="3d").mask  # eager decoder; starts the compile thread
        assert model._encoder.wait_ready(timeout=1800), model._encoder.describe()
    assert model._decoder.backend == "compile", model._decoder.status
    assert model._decoder.compile_seconds is not None
    assert model.backends() == {"encoder": "compile", "decoder": "compile"}
    assert any("mask decoder compiled" in r.getMessage() for r in caplog.records)

    assert _compare_with_eager(model, [model._decoder], phantom) >= 40
    assert model._decoder.backend == "compile"  # no call fell back

    model.clear_cache()
    model._memo.clear()
    model._memo_bytes = 0
    after = model.segment(image, prompts, mode="3d").mask  # compiled encoder and decoder
    assert dice(after, before) >= 0.99
    assert abs(int(after.sum()) - int(before.sum())) <= 0.01 * int(before.sum())


def test_a_failing_compiled_decoder_falls_back_to_eager_once(litemedsam, phantom, caplog) -> None:
    dec = BoxDecoder(litemedsam._net, torch.device("cpu"))

    def broken(*_a, **_k):
        raise RuntimeError("inductor kernel crashed")

    dec._fn, dec.backend = broken, "compile"  # what a compiled graph that breaks at run time looks like
    image, a, _ = phantom
    ks = np.flatnonzero(a.any(axis=(1, 2)))
    sl = to_uint8(image.array[int(ks[len(ks) // 2])], *intensity_range(image.array, "CT",
                                                                      IntensityParams.from_settings(LiteMedSAMSettings())))
    emb, hw, s = _embed(litemedsam, sl)
    boxes = torch.tensor([[[40.0, 40.0, 120.0, 140.0]], [[60.0, 50.0, 100.0, 90.0]]])
    with caplog.at_level(logging.WARNING, logger="models.decoders"):
        got = dec(emb, boxes, False)
        again = dec(emb, boxes[:1], False)
    want = BoxDecoder(litemedsam._net, torch.device("cpu"))(emb, boxes, False)
    assert torch.equal(got[0], want[0])
    assert float((again[0] - want[0][:1]).abs().max()) < 1e-4  # batch of 1 vs 2: float32 rounding only
    assert dec.backend == "eager" and "inductor kernel crashed" in dec.status
    warnings = [r for r in caplog.records if "mask decoder" in r.getMessage()]
    assert len(warnings) == 1


def test_the_default_model_decodes_on_onnx_runtime_and_never_compiles(litemedsam) -> None:
    """``auto`` on a CPU: the image encoder and the mask decoder on ONNX Runtime, with two lanes, no compile thread."""
    assert litemedsam._encoder.then(lambda: None) is False
    assert litemedsam._decoder.backend == "onnx" and litemedsam._decoder.status == ""
    assert litemedsam._decoder.lanes == 2
    assert litemedsam.backends() == {"encoder": "onnx", "decoder": "onnx"}


def test_onnx_runtime_decoder_and_its_lanes_match_eager(litemedsam, phantom) -> None:
    """One box, batches of candidates and the multimask outputs, on phantom and real CT / MR slices; every lane."""
    dec = litemedsam._decoder
    assert dec.backend == "onnx"

    def on_lane(i):
        def run(*args):
            with dec.lane(i):
                return dec(*args)
        return run

    assert _compare_with_eager(litemedsam, [dec, on_lane(0), on_lane(1)], phantom) >= 120
    assert dec.backend == "onnx"  # no call fell back


def test_an_onnx_runtime_decoder_that_cannot_be_built_leaves_eager_answering(litemedsam, monkeypatch, caplog) -> None:
    from models import decoders

    def broken(*_a, **_k):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(decoders, "export_onnx", broken)
    dec = BoxDecoder(litemedsam._net, torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="models.decoders"):
        assert dec.use_onnx() is False
    assert dec.backend == "eager" and dec.lanes == 0 and "exporter exploded" in dec.status
    assert [r for r in caplog.records if "mask decoder" in r.getMessage()]
    emb = torch.randn(1, 256, 64, 64)
    with dec.lane(1):  # no lanes: the ordinary (eager) call
        got = dec(emb, torch.tensor([[[40.0, 40.0, 120.0, 140.0]]]), False)
    assert got[0].shape == (1, 1, 256, 256)
    assert not litemedsam._net.training  # the export left the network in eval mode


def test_lanes_split_the_threads(litemedsam) -> None:
    """Each of the two lanes gets half the decoder's threads (one each on 2 cores); one thread: no lanes."""
    four = BoxDecoder(litemedsam._net, torch.device("cpu"))
    assert four.use_onnx(threads=4) and four.lanes == 2 and four.lane_threads == 2
    one = BoxDecoder(litemedsam._net, torch.device("cpu"))
    assert one.use_onnx(threads=1) and one.backend == "onnx" and one.lanes == 0 and one.lane_threads == 0
    n = torch.get_num_threads()
    assert litemedsam._decoder.lane_threads == (n // 2 if n >= 2 else 0)
