"""LiteMedSAM's prompt encoder + mask decoder as one call, eager or compiled (``BoxDecoder``).

The decoder runs once per propagated slice and once (batched) per click, so after pre-encoding it
is the whole interactive cost: ~35-50 ms per single-box call eager on a 2-core CPU, most of it
elementwise work around the matmuls (residual adds, the embedding copies, softmax, layer norms)
and Python dispatch, not FLOPs (~3.5 GFLOP per box, ~17 ms at this CPU's float32 matmul peak).

``BoxDecoder`` answers with the eager modules until :meth:`BoxDecoder.compile` (run by the image
encoder's background compile thread, :meth:`models.encoders.Encoder.then`) has built and checked
a ``torch.compile`` version; from then on the compiled one answers (~1.5x faster for one box,
~2x for a batch of candidate boxes; figures: docs/benchmarks.md). The compiled graphs are:
one box (propagation, box prompts), one box with the multimask outputs, and a batch of any size
(click candidates; the batch dimension is dynamic, so no size triggers a new compile). Arithmetic
stays float32 and the compiled result must agree with eager on a probe before it is used;
any failure leaves eager answering, logged once.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from models.encoders import brief

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

logger = logging.getLogger(__name__)

#: Largest |difference| of the compiled decoder's logits from eager on the probe (logits are O(10)).
PROBE_TOLERANCE = 1e-3


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
        #: ``eager`` or ``compile`` (the implementation answering now).
        self.backend = "eager"
        #: Why the decoder is not compiled, when a compile was attempted and failed; else empty.
        self.status = ""
        #: Seconds the compile took (None until one finished).
        self.compile_seconds: float | None = None

    def __call__(self, embedding: torch.Tensor, boxes: torch.Tensor, multimask: bool) -> tuple[Any, Any]:
        """``embedding`` (1, 256, 64, 64) float32, ``boxes`` (N, 1, 4) float32 at the 256 scale."""
        import torch

        with self._lock:
            fn, name = self._fn, self.backend
        with torch.inference_mode():
            pe = self.dense_pe()
            if name == "eager":
                return fn(embedding, pe, boxes, multimask)
            try:
                # the compiled graphs were built for inference tensors: never recompile for another kind
                embedding, boxes = _inference(embedding), _inference(boxes)
                if boxes.shape[0] > 1:
                    torch._dynamo.mark_dynamic(boxes, 0)
                return fn(embedding, pe, boxes, multimask)
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - a failing compiled graph falls back, logged once
                self._fallback(f"compiled decoder failed on {boxes.shape[0]} box(es) ({type(exc).__name__}: {exc})")
                return self._eager(embedding, pe, boxes, multimask)

    def dense_pe(self) -> Any:
        """Positional encoding of the 64 x 64 embedding grid (a constant, computed once)."""
        if self._pe is None:
            import torch

            with torch.inference_mode():
                self._pe = self._net.prompt_encoder.get_dense_pe()
        return self._pe

    def compile(self) -> None:
        """Build, warm and check the compiled decoder; switch to it when it agrees with eager.

        Runs in the image encoder's background compile thread (never on a request's thread).
        """
        import torch

        t0 = time.perf_counter()
        try:
            compiled = torch.compile(self._eager, dynamic=None)
            worst = 0.0
            with torch.inference_mode():
                pe = self.dense_pe()
                # every graph a request can need: one box, one box with the multimask outputs, a batch
                for n, multimask in ((1, False), (1, True), (3, False), (3, True)):
                    emb, boxes = _probe(self._device, n)
                    if n > 1:
                        torch._dynamo.mark_dynamic(boxes, 0)
                    got = compiled(emb, pe, boxes, multimask)
                    want = self._eager(emb, pe, boxes, multimask)
                    for g, w in zip(got, want):
                        worst = max(worst, float((g - w).abs().max()))
            if not worst <= PROBE_TOLERANCE:
                raise RuntimeError(f"compiled decoder differs from eager by {worst:.3g} on the probe")
        except Exception as exc:  # noqa: BLE001 - any compile failure leaves eager answering
            self._fallback(f"torch.compile failed ({brief(exc)})")
            return
        self.compile_seconds = time.perf_counter() - t0
        with self._lock:
            self._fn, self.backend, self.status = compiled, "compile", ""
        logger.info("LiteMedSAM mask decoder compiled in %.1f s (max |diff| vs eager %.2g)", self.compile_seconds, worst)

    # ------------------------------------------------------------------ internals

    def _eager(self, embedding: torch.Tensor, pe: torch.Tensor, boxes: torch.Tensor, multimask: bool) -> tuple[Any, Any]:
        """SAM's ``MaskDecoder.forward`` for N boxes on one embedding, the image side shared by the N boxes.

        ``MaskDecoder.predict_masks`` copies the embedding and its positional encoding N times
        (``repeat_interleave``) before the two-way transformer. Its modules broadcast over the batch
        dimension, so here the image side goes in once: the first block's image-side projections
        (token-to-image keys and values, image-to-token queries) and the embedding + dense prompt
        sum are computed once instead of N times (~20 % of a batch of click candidates). Everything
        after is the same per box, as upstream; a single box runs exactly upstream's operations.
        """
        import torch

        net = self._net
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

    def _fallback(self, why: str) -> None:
        with self._lock:
            first = not self.status
            self._fn, self.backend, self.status = self._eager, "eager", why
        if first:
            logger.warning("LiteMedSAM mask decoder: %s; the eager decoder answers", why)


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
