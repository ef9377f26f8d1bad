"""Cached ONNX exports (models/encoders.py ``cached_onnx``): the second model load reads the image encoder's and the
mask decoder's ONNX graphs from ``<cache>/onnx`` instead of exporting them again; a damaged file is replaced by a
fresh export (never used); a new export of the same graph removes the old file."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from config.settings import LiteMedSAMSettings, ModelSettings
from models import decoders, encoders
from models.encoders import cached_onnx
from models.litemedsam import LiteMedSAM


def _load(cache: Path) -> LiteMedSAM:
    return LiteMedSAM(LiteMedSAMSettings(), ModelSettings(device="cpu"), cache_dir=cache / "embeddings")


def _no_export(*_a, **_k):
    raise AssertionError("exported although a cached export was there")


def test_the_second_load_reads_the_exports_from_the_cache(tmp_path, monkeypatch) -> None:
    first = _load(tmp_path)
    assert first.backends() == {"encoder": "onnx", "decoder": "onnx"}
    folder = tmp_path / "encoder-cache" / "onnx"
    assert sorted(p.name.rsplit("-", 1)[0] for p in folder.glob("*.onnx")) == ["decoder", "decoder-multimask", "encoder"]
    monkeypatch.setattr(encoders, "export_onnx", _no_export)
    monkeypatch.setattr(decoders, "export_onnx", _no_export)
    second = _load(tmp_path)
    assert second.backends() == {"encoder": "onnx", "decoder": "onnx"}  # both probe-checked against eager
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
