"""Pre-encoding: a series stored by C-STORE becomes stable -> embeddings on disk; a restarted node reuses them;
interactive work preempts pre-encoding; the disk cache is evicted by size and a corrupt entry is recomputed."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import peers
from config.settings import HttpSettings, LiteMedSAMSettings, ModelSettings, Settings
from dicom_io.phantom import write_phantom_series
from dicom_io.scu import Peer, send_instances
from dicom_io.series import load_series
from models.base import ImageVolume, PointPrompt, Prompts

SHAPE = (6, 64, 64)
SPACING = (1.5, 1.5, 3.0)
ENTRY_BYTES = 256 * 64 * 64 * 2  # one float16 LiteMedSAM slice embedding


def _phantom(out: Path, seed: int, shape: tuple[int, int, int] = SHAPE) -> Any:
    return write_phantom_series(out, shape=shape, spacing=SPACING, origin=(-48.0, -48.0, -9.0), seed=seed)


def _click(ph: Any) -> tuple[Prompts, int]:
    k = int(np.argmax(ph.mask.sum(axis=(1, 2))))
    ys, xs = np.nonzero(ph.mask[k])
    return Prompts(points=(PointPrompt(float(xs.mean()), float(ys.mean()), k),)), k


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1.0, float(a.sum() + b.sum()))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A LiteMedSAM whose disk cache holds 5 slices (so a 6th evicts)."""
    from models.litemedsam import LiteMedSAM

    settings = LiteMedSAMSettings(disk_cache_gb=5.5 * ENTRY_BYTES / 1024**3)
    return LiteMedSAM(settings, ModelSettings(device="cpu"), cache_dir=tmp_path_factory.mktemp("embeddings"))


def test_stable_series_is_preencoded_and_a_restart_reuses_it(start_node: Any, tmp_path: Path) -> None:
    from models import registry
    from node.api.core import SeriesRef
    from node.inference import INTERACTIVE

    registry.clear_cache()
    base = peers.node_settings(tmp_path / "node")
    # encoder "fused": the default ("auto") compiles the encoder in a background thread, which this short test
    # would leave running at interpreter exit; pre-encoding does not depend on the encoder backend
    settings = dataclasses.replace(base, model=ModelSettings(device="cpu"),
                                   litemedsam=LiteMedSAMSettings(encoder_backend="fused"),
                                   http=HttpSettings(host="127.0.0.1", port=peers.free_port()))
    node = start_node(settings)
    ph = _phantom(tmp_path / "ct", seed=3)
    sent = send_instances(Peer(settings.dimse.ae_title, "127.0.0.1", node.port, calling_ae_title="MODALITY",
                               timeout=10), ph.paths)
    assert all(r.ok for r in sent), sent
    folder = settings.data_path / "embeddings"
    # SeriesStable fires after the quiet period; pre-encoding then runs in the background
    assert peers.wait_until(lambda: len(list(folder.rglob("*.emb"))) == SHAPE[0], timeout=300, interval=0.5)
    first = node.service.api.inference.queue("litemedsam").segmenter
    assert first.encoder_calls == SHAPE[0]
    node.service.stop()

    registry.clear_cache()  # what a new process would do: load the model afresh
    node2 = start_node(settings)
    ctx = node2.service.api
    series = ctx.load_series_blocking(SeriesRef(ph.series_instance_uid))
    ctx.sessions.create("reader", series, "litemedsam", mode="3d")  # schedules pre-encoding (from disk)
    prompts, k = _click(ph)
    job = ctx.submit("litemedsam", series, prompts, "3d", "reader", kind="session", priority=INTERACTIVE)
    inferred = job.future.result(timeout=300)
    second = ctx.inference.queue("litemedsam").segmenter
    assert second is not first
    assert second.encoder_calls == 0 and inferred.result.stats["slices_encoded"] == 0
    assert inferred.result.mask[k].any() and _dice(inferred.result.mask, ph.mask) > 0.5


def test_interactive_work_preempts_preencoding(model: Any, tmp_path: Path) -> None:
    from node.inference import DONE, INTERACTIVE, InferencePool, Preencoder
    from node.pipeline import image_volume

    settings = Settings(data_dir=str(tmp_path), model=ModelSettings(device="cpu"))
    pool = InferencePool(settings, lambda name, s: model)
    try:
        ph = _phantom(tmp_path / "ct", seed=11)
        series = load_series(ph.paths)
        before = model.encoder_calls
        bg = Preencoder(pool, settings).schedule(series, to_memory=True)
        assert bg is not None
        assert peers.wait_until(lambda: model.encoder_calls > before, timeout=120, interval=0.01)
        prompts, k = _click(ph)
        fg = pool.submit("litemedsam", lambda seg, ctx: seg.segment(image_volume(series), prompts, mode="2d"),
                         priority=INTERACTIVE)
        result = fg.future.result(timeout=120)
        assert result.mask[k].any()
        first = bg.future.result(timeout=5)
        # the pre-encoding stopped at a slice boundary and left the rest for later
        assert first.remaining and first.encoded + first.cached + first.loaded + len(first.remaining) == SHAPE[0]
        assert fg.started is not None and bg.finished is not None and fg.started >= bg.finished
        # ... then resumed behind the interactive job and finished the series
        assert peers.wait_until(lambda: model.encoder_calls - before == SHAPE[0] and not pool.status()["litemedsam"]
                                ["running"], timeout=180, interval=0.05)
        status = pool.status()["litemedsam"]
        assert status["queued"] == 0 and status["background"] == 0 and bg.state == DONE
    finally:
        pool.stop()


def test_disk_cache_is_evicted_by_size_and_corrupt_entries_are_recomputed(model: Any, tmp_path: Path) -> None:
    from models.embedding_cache import DiskEmbeddingCache

    assert model.disk_cache is not None
    # a fresh cache folder (other tests of this module filled the model's own)
    disk = DiskEmbeddingCache(tmp_path / "embeddings", model.disk_cache.namespace, model.disk_cache.max_bytes)
    model.disk_cache = disk
    a = load_series(_phantom(tmp_path / "a", seed=21, shape=(3, 32, 32)).paths)
    b_ph = _phantom(tmp_path / "b", seed=22, shape=(3, 32, 32))
    b = load_series(b_ph.paths)
    vol_a = ImageVolume(a.voxels, modality="CT", key="series-a")
    vol_b = ImageVolume(b.voxels, modality="CT", key="series-b")
    ra = model.prefetch(vol_a, to_memory=False)
    assert ra.encoded == 3 and ra.complete
    rb = model.prefetch(vol_b, to_memory=False)
    assert rb.encoded == 3
    # 6 entries exceed the 5.5-entry limit: the least recently used series (a) went first
    assert disk.evicted == 3 and disk.total_bytes <= disk.max_bytes
    a_dir, b_dir = (disk.path(key, b"x").parent for key in ("series-a", "series-b"))
    assert not list(a_dir.glob("*.emb")) and len(list(b_dir.glob("*.emb"))) == 3
    # nothing more to do for b
    again = model.prefetch(vol_b, to_memory=False)
    assert again.encoded == 0 and again.cached == 3

    # damage one entry of b; after dropping the memory cache, that slice is encoded again, the others are read
    victim = sorted(b_dir.glob("*.emb"))[0]
    victim.write_bytes(victim.read_bytes()[:1000])
    model.clear_cache()
    before = model.encoder_calls
    res = model.prefetch(vol_b, to_memory=True)
    assert res.encoded == 1 and res.loaded == 2
    assert model.encoder_calls == before + 1
    assert victim.stat().st_size > ENTRY_BYTES  # rewritten whole
    prompts, k = _click(b_ph)
    out = model.segment(vol_b, prompts, mode="2d")
    assert out.stats["slices_encoded"] == 0 and out.mask[k].any()


def test_stable_series_backlog_keeps_the_newest(tmp_path: Path) -> None:
    import threading

    from node.inference import BATCH, InferencePool, Preencoder

    settings = dataclasses.replace(Settings(data_dir=str(tmp_path), model=ModelSettings(device="cpu")),
                                   litemedsam=LiteMedSAMSettings(preencode_backlog=2))
    loaded: list[str] = []
    pool = InferencePool(settings, lambda name, s: object())  # the jobs below never reach a model call
    release = threading.Event()
    try:
        busy = pool.submit("litemedsam", lambda seg, ctx: release.wait(60), priority=BATCH)
        assert peers.wait_until(lambda: busy.state == "running", timeout=30)
        pre = Preencoder(pool, settings, lambda uid: loaded.append(uid))  # returns None: nothing to encode
        jobs = [pre.schedule_uid(f"1.2.3.{i}") for i in range(4)]
        assert all(j is not None for j in jobs)
        assert pool.status()["litemedsam"]["background"] == 4
        release.set()
        for j in jobs:
            j.future.result(timeout=60)
        assert loaded == ["1.2.3.2", "1.2.3.3"]  # the two oldest were skipped unloaded
        off = dataclasses.replace(settings, litemedsam=LiteMedSAMSettings(preencode_backlog=0))
        assert Preencoder(pool, off, lambda uid: None).schedule_uid("1.2.3.9") is None
    finally:
        release.set()
        pool.stop()
