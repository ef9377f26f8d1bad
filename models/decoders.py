"""LiteMedSAM's prompt encoder + mask decoder as one call: eager, ONNX Runtime or compiled (``BoxDecoder``).

The decoder runs once per propagated slice and once (batched) per click, so after pre-encoding it
is the whole interactive cost: ~35-50 ms per single-box call eager on a 2-core CPU, most of it
elementwise work around the matmuls (residual adds, the embedding copies, softmax, layer norms)
and Python dispatch, not FLOPs (~3.6 GFLOP per box, ~17 ms at this CPU's float32 matmul peak).

Implementations (all float32; each must agree with eager on a probe before it answers, and any
failure leaves eager answering, logged once):

* ``onnx`` (:meth:`BoxDecoder.use_onnx`; CPUs, chosen with the image encoder's ``onnx`` backend):
  exported to ONNX at load (cached on disk for the next load), one graph for the single-mask output
  and one for the multimask outputs, the number of boxes dynamic, and run by ONNX Runtime: ~20 ms
  per box, ready in about a second. It also opens **lanes**: sessions of the same graph with half
  the threads each (single-threaded on a 2-core CPU), so the two directions of a 3D propagation
  run side by side (:meth:`BoxDecoder.lane`): one box does not keep all the threads busy, two
  chains of boxes do.
* ``compile`` (:meth:`BoxDecoder.compile`, run by the image encoder's background compile thread,
  :meth:`models.encoders.Encoder.then`, when the encoder compiles): ``torch.compile`` graphs for
  one box, one box with the multimask outputs and a batch of any size (dynamic), ~24 ms per box
  after a ~40-50 s compile.
* ``eager``: the modules as they are (CUDA, and the fallback).
"""

from __future__ import annotations

import io
import logging
import os
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.encoders import brief, build_cached, ort_session

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

logger = logging.getLogger(__name__)

#: Largest |difference| of the compiled / ONNX Runtime decoder's logits from eager on the probe (logits are O(10)).
PROBE_TOLERANCE = 1e-3
#: ONNX Runtime sessions opened for parallel propagation (one per direction), each with this share of the threads.
LANES = 2


class BoxDecoder:
    """Boxes on one slice embedding -> mask logits (N, C, 256, 256) and predicted IoU (N, C).

    Parameters
    ----------
    net
        The LiteMedSAM network (``prompt_encoder`` and ``mask_decoder`` are used, float32).
    device
        Torch device the network is on.
    """

    def __init__(self, net: Any, device: torch.device) -> None:
        self._net = net
        self._device = device
        self._pe: Any = None
        self._lock = threading.Lock()
        self._fn: Any = self._eager
        self._lane_fns: list[Any] = []
        #: Intra-op threads of each lane (0 without lanes).
        self.lane_threads = 0
        self._local = threading.local()
        #: ``eager``, ``onnx`` or ``compile`` (the implementation answering now).
        self.backend = "eager"
        #: Why the decoder is not ``onnx`` / ``compile``, when one was attempted and failed; else empty.
        self.status = ""
        #: Seconds the compile took (None until one finished).
        self.compile_seconds: float | None = None

    def __call__(self, embedding: torch.Tensor, boxes: torch.Tensor, multimask: bool) -> tuple[Any, Any]:
        """``embedding`` (1, 256, 64, 64) float32, ``boxes`` (N, 1, 4) float32 at the 256 scale."""
        import torch

        lane = getattr(self._local, "lane", None)
        with self._lock:
            fn, name = self._fn, self.backend
            if name == "onnx" and lane is not None and not multimask and lane < len(self._lane_fns):
                fn = self._lane_fns[lane]
        with torch.inference_mode():
            pe = self.dense_pe()
            if name == "eager":
                eager: tuple[Any, Any] = fn(embedding, pe, boxes, multimask)
                return eager
            try:
                if name == "compile":
                    # the compiled graphs were built for inference tensors: never recompile for another kind
                    embedding, boxes = _inference(embedding), _inference(boxes)
                    if boxes.shape[0] > 1:
                        torch._dynamo.mark_dynamic(boxes, 0)
                out: tuple[Any, Any] = fn(embedding, pe, boxes, multimask)
                return out
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - a failing backend falls back, logged once
                self._fallback(f"{name} decoder failed on {boxes.shape[0]} box(es) ({type(exc).__name__}: {exc})")
                return self._eager(embedding, pe, boxes, multimask)

    @property
    def lanes(self) -> int:
        """How many lanes (half-thread sessions) can decode side by side (0: run one call at a time)."""
        with self._lock:
            return len(self._lane_fns) if self.backend == "onnx" else 0

    @contextmanager
    def lane(self, index: int | None) -> Iterator[None]:
        """Single-box calls from this thread use lane ``index`` (a session with half the threads) meanwhile.

        ``None`` (or a backend without lanes) uses the ordinary implementation. Results are the same
        either way (the same float32 graph); only the number of threads per call differs.
        """
        before = getattr(self._local, "lane", None)
        self._local.lane = index
        try:
            yield
        finally:
            self._local.lane = before

    def dense_pe(self) -> Any:
        """Positional encoding of the 64 x 64 embedding grid (a constant, computed once)."""
        if self._pe is None:
            import torch

            with torch.inference_mode():
                self._pe = self._net.prompt_encoder.get_dense_pe()
        return self._pe

    def use_onnx(self, threads: int | None = None, cache_dir: str | os.PathLike[str] | None = None) -> bool:
        """Export the decoder to ONNX and answer with ONNX Runtime (CPU, float32); True when it answers.

        Two graphs (single-mask and multimask outputs, any number of boxes), run with ``threads``
        intra-op threads (default: torch's), plus :data:`LANES` sessions of the single-mask graph
        with ``threads // LANES`` threads each (one on a 2-core CPU) for parallel propagation. With
        ``cache_dir`` the exports are kept there and reused by the next load
        (:func:`models.encoders.cached_onnx`). Checked against eager on the probe (one box, one box
        with the multimask outputs, a batch) before it answers; on any failure eager keeps
        answering and the reason is logged once (:attr:`status`).
        """
        t0 = time.perf_counter()
        exports = {"decoder": lambda: export_onnx(self._net, self.dense_pe(), False),
                   "decoder-multimask": lambda: export_onnx(self._net, self.dense_pe(), True)}
        try:
            main, lanes, worst, n_threads = build_cached(
                Path(cache_dir) if cache_dir else None, exports, [self._net.prompt_encoder, self._net.mask_decoder],
                lambda g, reference: self._build_onnx({False: g["decoder"], True: g["decoder-multimask"]}, threads,
                                                      reference))
        except Exception as exc:  # noqa: BLE001 - any build failure leaves eager answering, logged once
            self._fallback(f"ONNX Runtime failed ({brief(exc)})")
            return False
        import onnxruntime as ort

        with self._lock:
            self._fn, self._lane_fns, self.backend, self.status = main, lanes, "onnx", ""
            self.lane_threads = n_threads // LANES if lanes else 0
        logger.info("LiteMedSAM mask decoder on ONNX Runtime %s in %.1f s (%d lanes; max |diff| vs eager %.2g)",
                    ort.__version__, time.perf_counter() - t0, len(lanes), worst)
        return True

    def _build_onnx(self, graphs: dict[bool, bytes], threads: int | None,
                    reference: Any = None) -> tuple[Any, list[Any], float, int]:
        """Sessions for ``graphs`` checked against eager on the probe (``reference``: see
        :func:`models.encoders.build_cached`): (main, lanes, max |diff|, threads)."""
        import numpy as np
        import torch

        def runner(sessions: dict[bool, Any]) -> Any:
            def run(embedding: torch.Tensor, _pe: torch.Tensor, boxes: torch.Tensor,
                    multimask: bool) -> tuple[Any, Any]:
                feed = {"embedding": np.ascontiguousarray(embedding.detach().cpu().numpy(), dtype=np.float32),
                        "boxes": np.ascontiguousarray(boxes.detach().cpu().numpy(), dtype=np.float32)}
                masks, iou = sessions[multimask].run(None, feed)
                return torch.from_numpy(masks), torch.from_numpy(iou)

            return run

        n_threads = threads or torch.get_num_threads()
        main = runner({m: ort_session(g, n_threads) for m, g in graphs.items()})
        lanes = []
        for _ in range(LANES if n_threads >= LANES else 0):
            share = ort_session(graphs[False], n_threads // LANES)
            lanes.append(runner({False: share, True: share}))  # multimask never goes to a lane
        worst = self._probe_diff(lambda multimask: [main] if multimask else [main, *lanes[:1]], reference)
        if not worst <= PROBE_TOLERANCE:
            raise RuntimeError(f"the ONNX Runtime decoder differs from eager by {worst:.3g} on the probe")
        return main, lanes, worst, n_threads

    def compile(self) -> None:
        """Build, warm and check the compiled decoder; switch to it when it agrees with eager.

        Runs in the image encoder's background compile thread (never on a request's thread).
        """
        import torch

        t0 = time.perf_counter()
        try:
            compiled = torch.compile(self._eager, dynamic=None)

            def run(emb: torch.Tensor, pe: torch.Tensor, boxes: torch.Tensor, multimask: bool) -> tuple[Any, Any]:
                if boxes.shape[0] > 1:
                    torch._dynamo.mark_dynamic(boxes, 0)  # one graph for every batch size
                return compiled(emb, pe, boxes, multimask)

            worst = self._probe_diff(lambda multimask: [run])
            if not worst <= PROBE_TOLERANCE:
                raise RuntimeError(f"compiled decoder differs from eager by {worst:.3g} on the probe")
        except Exception as exc:  # noqa: BLE001 - any compile failure leaves eager answering
            self._fallback(f"torch.compile failed ({brief(exc)})")
            return
        self.compile_seconds = time.perf_counter() - t0
        with self._lock:
            self._fn, self.backend, self.status = compiled, "compile", ""
        logger.info("LiteMedSAM mask decoder compiled in %.1f s (max |diff| vs eager %.2g)",
                    self.compile_seconds, worst)

    # ------------------------------------------------------------------ internals

    def _probe_diff(self, fns: Any, reference: Any = None) -> float:
        """Largest |difference| from eager of every ``fns(multimask)`` on the probe: one box, one box with
        the multimask outputs, a batch (every graph a request can need). ``reference(name, inputs,
        compute)`` may supply eager's outputs from a cache (:func:`models.encoders.build_cached`)."""
        import torch

        cases = ((1, False), (1, True), (3, False), (3, True))
        worst = 0.0
        with torch.inference_mode():
            pe = self.dense_pe()
            probes = [_probe(self._device, n) for n, _ in cases]

            def eager() -> list[Any]:
                return [out for (_, multimask), (emb, boxes) in zip(cases, probes, strict=True)
                        for out in self._eager(emb, pe, boxes, multimask)]

            inputs = [pe, *(t for pair in probes for t in pair)]
            wants = reference("decoder-probe", inputs, eager) if reference is not None else eager()
            for i, ((_, multimask), (emb, boxes)) in enumerate(zip(cases, probes, strict=True)):
                want = wants[2 * i: 2 * i + 2]
                for fn in fns(multimask):
                    for g, w in zip(fn(emb, pe, boxes, multimask), want, strict=True):
                        worst = max(worst, float((g - w.to(g.device)).abs().max()))
        return worst

    def _eager(self, embedding: torch.Tensor, pe: torch.Tensor, boxes: torch.Tensor,
               multimask: bool) -> tuple[Any, Any]:
        """SAM's ``MaskDecoder.forward`` for N boxes on one embedding, the image side shared by the N boxes.

        ``MaskDecoder.predict_masks`` copies the embedding and its positional encoding N times
        (``repeat_interleave``) before the two-way transformer. Its modules broadcast over the batch
        dimension, so here the image side goes in once: the first block's image-side projections
        (token-to-image keys and values, image-to-token queries) and the embedding + dense prompt
        sum are computed once instead of N times (~20 % of a batch of click candidates). Everything
        after is the same per box, as upstream; a single box runs exactly upstream's operations.
        """
        return decode_boxes(self._net, embedding, pe, boxes, multimask)

    def _fallback(self, why: str) -> None:
        with self._lock:
            first = not self.status
            self._fn, self._lane_fns, self.backend, self.status = self._eager, [], "eager", why
        if first:
            logger.warning("LiteMedSAM mask decoder: %s; the eager decoder answers", why)


def decode_boxes(net: Any, embedding: torch.Tensor, pe: torch.Tensor, boxes: torch.Tensor,
                 multimask: bool) -> tuple[Any, Any]:
    """Prompt encoder + mask decoder of ``net`` for N boxes on one embedding (see :meth:`BoxDecoder._eager`)."""
    import torch

    md = net.mask_decoder
    sparse, dense = net.prompt_encoder(points=None, boxes=boxes, masks=None)
    n = sparse.shape[0]
    output_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(n, -1, -1), sparse), dim=1)
    # without a mask prompt the dense embedding is the same learned vector for every box
    src = embedding + dense[:1]
    b, c, h, w = src.shape
    hs, keys = md.transformer(src, pe, tokens)  # keys: (N, h*w, c) after the first block
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1 : (1 + md.num_mask_tokens), :]
    upscaled = md.output_upscaling(keys.transpose(1, 2).reshape(n, c, h, w))
    hyper_in = torch.stack(
        [md.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in range(md.num_mask_tokens)], dim=1
    )
    _, uc, uh, uw = upscaled.shape
    masks = (hyper_in @ upscaled.view(n, uc, uh * uw)).view(n, -1, uh, uw)
    iou_pred = md.iou_prediction_head(iou_token_out)
    chosen = slice(1, None) if multimask else slice(0, 1)
    return masks[:, chosen, :, :], iou_pred[:, chosen]


def export_onnx(net: Any, pe: torch.Tensor, multimask: bool) -> bytes:
    """:func:`decode_boxes` for a fixed ``multimask`` as an ONNX model (in memory), inputs ``embedding``
    (1, 256, 64, 64) and ``boxes`` (N, 1, 4), outputs ``masks`` and ``iou``; N is dynamic."""
    import torch

    class Graph(torch.nn.Module):  # eval() before the export: the exporter restores the wrapper's mode
        pe: torch.Tensor  # a registered buffer

        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.register_buffer("pe", pe.clone())

        def forward(self, embedding: torch.Tensor, boxes: torch.Tensor) -> tuple[Any, Any]:
            return decode_boxes(self.net, embedding, self.pe, boxes, multimask)

    example = (torch.zeros(1, 256, 64, 64), torch.tensor([[[10.0, 10.0, 100.0, 100.0]]]))
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # the TorchScript-based exporter warns about its deprecation and about Python scalars in the
        # trace (head sizes); the graph is checked against eager before it is used
        warnings.simplefilter("ignore")
        # the TorchScript exporter (dynamo=False) writes to a file object; torch annotates ``f`` with paths only
        torch.onnx.export(Graph().eval(), example, buf, dynamo=False, opset_version=17,  # type: ignore[arg-type]
                          input_names=["embedding", "boxes"], output_names=["masks", "iou"],
                          dynamic_axes={"boxes": {0: "n"}, "masks": {0: "n"}, "iou": {0: "n"}})
    return buf.getvalue()


def _inference(x: torch.Tensor) -> torch.Tensor:
    """``x`` as an inference tensor (a copy when it was made outside inference mode)."""
    return x if x.is_inference() else x.clone()


def _probe(device: torch.device, n: int) -> tuple[Any, Any]:
    """A deterministic embedding and ``n`` boxes for the compiled-vs-eager check."""
    import torch

    g = torch.Generator().manual_seed(0)
    emb = torch.randn(1, 256, 64, 64, generator=g).to(device)
    base = torch.tensor([40.0, 52.0, 150.0, 170.0])
    boxes = torch.stack([base + 7.0 * i for i in range(n)]).reshape(n, 1, 4).to(device)
    return emb, boxes
