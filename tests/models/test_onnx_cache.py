"""Cached ONNX exports (models/encoders.py ``cached_onnx``): the second model load reads the image encoder's and the
mask decoder's ONNX graphs from ``<cache>/onnx`` instead of exporting them again; a damaged file is replaced by a
fresh export (never used); a new export of the same graph removes the old file. The probes' eager outputs are cached
beside them (``cached_reference``): the second load checks its sessions against those without running eager; a
damaged or wrong reference is computed again, never trusted."""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import pytest
import torch

from config.settings import LiteMedSAMSettings, ModelSettings
from models import decoders, encoders
from models.encoders import cached_onnx, cached_reference
from models.litemedsam import LiteMedSAM


def _load(cache: Path) -> LiteMedSAM:
    return LiteMedSAM(LiteMedSAMSettings(), ModelSettings(device="cpu"), cache_dir=cache / "embeddings")


def _no_export(*_a, **_k):
    raise AssertionError("exported although a cached export was there")


def test_the_second_load_reads_the_exports_from_the_cache(tmp_path, monkeypatch) -> None:
    first = _load(tmp_path)
    assert first.backends() == {"encoder": "onnx", "decoder": "onnx"}
    folder = tmp_path / "encoder-cache" / "onnx"
    assert (sorted(p.name.rsplit("-", 1)[0] for p in folder.glob("*.onnx"))
            == ["decoder", "decoder-multimask", "encoder"])
    assert sorted(p.name.rsplit("-", 1)[0] for p in folder.glob("*.ref.npz")) == ["decoder-probe", "encoder-probe"]
    monkeypatch.setattr(encoders, "export_onnx", _no_export)
    monkeypatch.setattr(decoders, "export_onnx", _no_export)
    real = encoders.cached_reference

    def no_eager(cache_dir, name, weights, inputs, compute):
        return real(cache_dir, name, weights, inputs, lambda: pytest.fail(f"eager ran for {name}"))

    monkeypatch.setattr(encoders, "cached_reference", no_eager)
    second = _load(tmp_path)
    # both checked against the cached eager outputs of the probe
    assert second.backends() == {"encoder": "onnx", "decoder": "onnx"}
    assert second._decoder.lanes == first._decoder.lanes


def test_a_damaged_cached_export_is_replaced_by_a_fresh_one(tmp_path, caplog) -> None:
    _load(tmp_path)
    folder = tmp_path / "encoder-cache" / "onnx"
    encoder_file = next(p for p in folder.glob("encoder-*.onnx"))
    decoder_file = next(p for p in folder.glob("decoder-*.onnx") if "multimask" not in p.name)
    good = encoder_file.read_bytes()
    encoder_file.write_bytes(good[: len(good) // 3])  # cut short
    decoder_file.write_bytes(b"not an onnx model")
    with caplog.at_level(logging.WARNING):
        model = _load(tmp_path)
    assert model.backends() == {"encoder": "onnx", "decoder": "onnx"}
    assert encoder_file.read_bytes() == good  # exported again, deterministically the same graph
    assert decoder_file.stat().st_size > 1_000_000
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "cached ONNX export" in messages and "cached ONNX decoder" in messages


def test_a_new_export_of_the_same_graph_removes_the_old_file(tmp_path) -> None:
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    data, cached = cached_onnx(tmp_path, "thing", [a], lambda: b"first")
    assert (data, cached) == (b"first", None)
    data, cached = cached_onnx(tmp_path, "thing", [a], lambda: pytest.fail("exported again"))
    assert data == b"first" and cached is not None
    data, _ = cached_onnx(tmp_path, "thing", [b], lambda: b"second")  # other weights: another key
    assert data == b"second"
    assert [p.read_bytes() for p in (tmp_path / "onnx").glob("thing-*.onnx")] == [b"second"]
    assert cached_onnx(None, "thing", [a], lambda: b"no cache") == (b"no cache", None)


def test_a_damaged_or_wrong_probe_reference_is_computed_again(tmp_path, caplog) -> None:
    import numpy as np

    _load(tmp_path)
    folder = tmp_path / "encoder-cache" / "onnx"
    enc_ref = next(folder.glob("encoder-probe-*.ref.npz"))
    dec_ref = next(folder.glob("decoder-probe-*.ref.npz"))
    with np.load(enc_ref) as z:
        good = z["a0"].copy()
    dec_ref.write_bytes(b"garbage")  # unreadable: computed again, the cached exports stay
    zeros = np.zeros_like(good)  # readable and intact, but not eager's output: the probe fails on it
    with open(enc_ref, "wb") as fh:
        np.savez(fh, n=np.int64(1), crc=np.array([zlib.crc32(zeros.tobytes())], dtype=np.int64), a0=zeros)
    with caplog.at_level(logging.WARNING):
        model = _load(tmp_path)
    assert model.backends() == {"encoder": "onnx", "decoder": "onnx"}
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "probe reference decoder-probe" in messages and "unreadable" in messages
    assert "cached ONNX encoder unusable" in messages  # then exported again, against a fresh reference
    with np.load(next(folder.glob("encoder-probe-*.ref.npz"))) as z:
        assert np.array_equal(z["a0"], good)
    assert next(folder.glob("decoder-probe-*.ref.npz")).stat().st_size > 1_000_000


def test_cached_reference_keys_on_weights_and_inputs_and_checks_its_crc(tmp_path) -> None:
    calls: list[int] = []

    def compute(value: float):
        def run():
            calls.append(1)
            return [torch.full((2, 3), value), torch.arange(4.0)]
        return run

    x, y = torch.ones(5), torch.zeros(5)
    first = cached_reference(tmp_path, "probe", "w1", [x], compute(1.0))
    again = cached_reference(tmp_path, "probe", "w1", [x], compute(9.0))  # read back, not computed
    assert len(calls) == 1 and all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert float(cached_reference(tmp_path, "probe", "w1", [y], compute(2.0))[0][0, 0]) == 2.0  # other inputs
    assert float(cached_reference(tmp_path, "probe", "w2", [y], compute(3.0))[0][0, 0]) == 3.0  # other weights
    assert len(list((tmp_path / "onnx").glob("probe-*.ref.npz"))) == 1  # the older ones removed
    path = next((tmp_path / "onnx").glob("probe-*.ref.npz"))
    data = bytearray(path.read_bytes())
    data[-200] ^= 0xFF  # flip a byte: a CRC (or zip) error, computed again
    path.write_bytes(bytes(data))
    assert float(cached_reference(tmp_path, "probe", "w2", [y], compute(4.0))[0][0, 0]) == 4.0
    assert cached_reference(None, "probe", "w2", [y], compute(5.0))[0][0, 0] == 5.0
