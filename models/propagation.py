"""3D masks from a 2D box-prompted SAM decoder: clicks as boxes, slice-to-slice propagation, corrections.

:class:`SlicePropagation` holds the prompt logic of :class:`models.litemedsam.LiteMedSAM` (which
provides the image embeddings and the batched box decoder); it works on one ``segment()`` call's
:class:`_Job`.

* Points: LiteMedSAM's point embeddings are untrained (a point alone gives an empty mask), so clicks
  become boxes: candidate boxes are built around the click(s) -- bounding boxes of regions grown from
  the click at a few noise-adapted tolerances, squares of 16..128 px (model scale) centred on the
  click, and the box spanning all positive clicks -- and all are decoded in one batched decoder call.
  Masks that miss a positive click or contain a negative click are rejected. Among the rest, a mask
  that lies inside its box (it does not reach the box's sides, so the box holds a whole object) is
  preferred: on real anatomy a box that cuts through an organ makes SAM spill into its neighbours,
  and SAM rates a large neighbour's mask highly, so predicted IoU alone leaks (a click on the IVC
  gave the liver). They are ranked by predicted IoU plus Dice agreement with the grown region.
* What defines the object, and what corrects it (3D): every box and the clicks on its slice, or
  without a box the first positive click, define the object (:func:`split_corrections`). Every
  later click is a correction, applied in the order given to the result so far and kept local:
  a positive click inside the mask changes nothing; outside it, the chain from the nearest
  segmented slice is continued up to it (an empty slice) or the object region around the click is
  added, then carried to the next slices while it still changes them (Dice of before and after
  < :data:`CORRECTION_AGREEMENT`) and by the usual stop rules; no slice gains more than
  :data:`CORRECTION_MAX_GROWTH` times the object's largest cross-section (a larger model region on
  the clicked slice is replaced by the intensity region grown from the click, so a click is never
  ignored), and a region unlike the object's intensity is not spread. A negative click removes the part of the
  mask it marks on its slice (region grown from it within the mask, on its side of the mask's
  innermost pixel and of positive clicks); a partial removal is carried away from the positively
  prompted slices to components that overlap what was removed more than what was kept. Masks are
  only ever united by positive corrections, so one click cannot undo correct slices elsewhere.
* Negative points and boxes given with a box on its slice remove the structure they mark there
  (region grown from the negative click inside the mask, confined to its Voronoi cell w.r.t. the
  positive clicks); the mask is then re-decoded with the box of what remains, and the re-decode is
  kept when it is consistent. Negative boxes clear the mask inside the box on their slice.
* 3D propagation runs from every defining slice in both directions. Each next slice is prompted
  with the previous mask's bounding box plus ``box_margin`` (pixels at the model's 256 scale); when
  that mask reaches the box's sides, larger boxes (+10 %, +25 % of its size) are decoded too and the
  mask that agrees best with the previous one (predicted IoU + Dice) is kept -- a box that is too
  tight makes masks shrink slice after slice, which stopped propagation after a few slices on real
  anatomy. It stops when the mask is empty, its predicted IoU < ``stop_iou``, its Dice with the
  previous mask < ``stop_overlap``, it grows more than :data:`PROPAGATION_MAX_GROWTH` times, or its
  mean intensity is more than ``stop_intensity`` standard deviations from the object's on the seed
  slice (the object has ended and SAM outlines whatever the box holds next), or the volume ends.
  The predicted IoU alone does not separate "object still here" from "object ended" on real CT and
  MR (docs/accuracy.md). The chains (each defining slice, up and down) are independent, so with the
  ONNX Runtime decoder they run side by side on two threads, one decoder lane (half the threads)
  each (same masks as one after the other; :func:`_run_chains`).
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from config.settings import LiteMedSAMSettings
from models import clicks
from models.base import ImageVolume, PointPrompt, Prompts
from models.intensity import to_uint8

logger = logging.getLogger("models.litemedsam")

#: Square candidate box sides around a click, in model (256-scale) pixels.
CLICK_SQUARES = (16, 32, 48, 64, 96, 128)
#: Region growing from a click is confined to a square of this half-size (model pixels).
CLICK_REGION_CAP = 128
#: Margin added around click-derived region boxes (model pixels).
CLICK_BOX_MARGIN = 3
#: Lowest predicted IoU of a click candidate chosen because its mask lies inside its box.
CLICK_MIN_IOU = 0.6
#: Weight of the agreement with the grown region when ranking click candidates.
CLICK_AGREEMENT_WEIGHT = 0.5
#: Relative growth (fraction of the previous mask's width/height, per side) of the extra candidate
#: boxes tried when propagating to the next slice.
PROPAGATION_GROWTH = (0.1, 0.25)
#: A correction stops spreading to the next slice once it changes that slice's mask this little
#: (Dice of the mask before and after).
CORRECTION_AGREEMENT = 0.9
#: A positive correction may add at most this many times the object's largest cross-section so far
#: to any one slice: a larger model region on the clicked slice marks a neighbour (the intensity
#: region grown from the click is added instead, so the click is still honoured), and carrying the
#: correction to further slices stops where it would add more (it has spilled into a neighbour).
CORRECTION_MAX_GROWTH = 2.0
#: Propagation stops when a slice's mask is more than this many times the previous slice's (on
#: the real CT/MR of benchmarks/accuracy, 99 % of correct steps grow less than 1.44x).
PROPAGATION_MAX_GROWTH = 1.5
#: A negative click farther than this (pixels) from the innermost pixel of the mask on its slice
#: removes only the part of the mask on its side (closer to it than to that pixel).
CORE_RADIUS = 3.0
#: Smallest standard deviation (model input units, 0..255) used for the intensity stop rule, so a
#: saturated object (air, cortical bone in a soft-tissue window) does not stop at the first noise.
INTENSITY_SD_FLOOR = 2.0


@dataclass
class _Embedding:
    tensor: Any  # torch.Tensor (1, 256, 64, 64), float16
    new_hw: tuple[int, int]
    scale: float
    key: bytes = b""  # digest of the slice's model input


@dataclass
class _Stats:
    encode: float = 0.0
    decode: float = 0.0
    encoded: int = 0
    decoded: int = 0
    loaded: int = 0  # embeddings read from the disk cache
    memo: int = 0  # decoder calls answered from the decode memo


@dataclass
class _SliceResult:
    mask: np.ndarray
    score: float
    removed: np.ndarray  # pixels removed by negative prompts (for propagation)
    #: Intensity of the object on the slice its chain started from (model input units): mean, spread.
    reference: tuple[float, float] | None = None


@dataclass
class _Job:
    """State of one segment() call."""

    image: ImageVolume
    lo: float
    hi: float
    stats: _Stats = field(default_factory=_Stats)
    u8: dict[int, np.ndarray] = field(default_factory=dict)
    smoothed: dict[int, np.ndarray] = field(default_factory=dict)

    def slice_u8(self, k: int) -> np.ndarray:
        if k not in self.u8:
            self.u8[k] = to_uint8(self.image.array[k], self.lo, self.hi)
        return self.u8[k]

    def slice_smoothed(self, k: int) -> np.ndarray:
        if k not in self.smoothed:
            self.smoothed[k] = clicks.smooth(self.slice_u8(k))
        return self.smoothed[k]


class SlicePropagation(ABC):
    """Prompts -> 3D mask on top of a box decoder (see the module docstring)."""

    settings: LiteMedSAMSettings

    @abstractmethod
    def _embedding(self, job: _Job, k: int) -> _Embedding:
        """Image embedding of slice ``k``."""

    @abstractmethod
    def _decode(
        self, job: _Job, emb: _Embedding, boxes: np.ndarray, shape: tuple[int, int], multimask: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Decode N boxes -> masks (N, C, H, W) bool and predicted IoU (N, C)."""

    def _segment_prompted_slice(self, job: _Job, k: int, p: Prompts) -> _SliceResult:
        shape = job.image.shape[1:]
        emb = self._embedding(job, k)
        pos_pts = [clicks.pixel(q.x, q.y, shape) for q in p.points if q.positive]
        neg_pts = [clicks.pixel(q.x, q.y, shape) for q in p.points if not q.positive]
        pos_boxes = [b for b in p.boxes if b.positive]

        if pos_boxes:
            mask = np.zeros(shape, dtype=bool)
            score = 1.0
            for b in pos_boxes:
                box = _clip_box((b.x0, b.y0, b.x1, b.y1), shape)
                inside = [q for q in pos_pts if _in_box(q, box)]
                m, s = self._box_with_constraints(job, emb, box, inside, neg_pts)
                mask |= m
                score = min(score, s)
            clipped = [_clip_box((b.x0, b.y0, b.x1, b.y1), shape) for b in pos_boxes]
            loose = [q for q in pos_pts if not any(_in_box(q, box) for box in clipped)]
            if loose:
                m, s = self._click(job, k, emb, loose, neg_pts)
                mask |= m
                score = min(score, s)
        else:
            mask, score = self._click(job, k, emb, pos_pts, neg_pts)

        mask, removed, score = self._apply_negatives(job, k, emb, mask, score, p, pos_pts)
        return _SliceResult(mask=mask, score=score, removed=removed, reference=_intensity(job.slice_u8(k), mask))

    def _box_with_constraints(
        self,
        job: _Job,
        emb: _Embedding,
        box: tuple[float, float, float, float],
        pos_pts: list[tuple[int, int]],
        neg_pts: list[tuple[int, int]],
    ) -> tuple[np.ndarray, float]:
        """A positive box is the prompt; clicks inside it choose among the decoder's outputs."""
        shape = job.image.shape[1:]
        masks, iou = self._decode(job, emb, np.array([box]), shape)
        best, best_iou = masks[0, 0], float(iou[0, 0])
        if not pos_pts and not any(best[n] for n in neg_pts):
            return best, best_iou
        if _satisfies(best, pos_pts, []):
            return best, best_iou
        mm, mm_iou = self._decode(job, emb, np.array([box]), shape, multimask=True)
        cands = [(best, best_iou)] + [(mm[0, i], float(mm_iou[0, i])) for i in range(mm.shape[1])]
        valid = [c for c in cands if _satisfies(c[0], pos_pts, [])]
        if valid:
            return max(valid, key=lambda c: c[1])
        logger.warning("no LiteMedSAM output for box %s contains the positive click(s); using the box result", box)
        return best, best_iou

    def _click(
        self,
        job: _Job,
        k: int,
        emb: _Embedding,
        pos_pts: list[tuple[int, int]],
        neg_pts: list[tuple[int, int]],
    ) -> tuple[np.ndarray, float]:
        """Click(s) -> candidate boxes -> best valid mask (see the module docstring)."""
        shape = job.image.shape[1:]
        h, w = shape
        sm = job.slice_smoothed(k)
        tols = clicks.tolerances(job.slice_u8(k))
        to_px = 1.0 / emb.scale
        cap = max(4, int(round(CLICK_REGION_CAP * to_px)))
        margin = CLICK_BOX_MARGIN * to_px

        boxes: list[tuple[float, float, float, float]] = []
        regions: list[clicks.Region] = []
        for q in pos_pts:
            cell = clicks.voronoi_cell(shape, [q], neg_pts)
            for tol in tols:
                reg = clicks.grow_region(sm, q, tol, allowed=cell, cap_half=cap)
                regions.append(reg)
                bb = reg.bbox()
                if bb is not None:
                    boxes.append(_expand(bb, margin, shape))
            for side in CLICK_SQUARES:
                half = side * to_px / 2.0
                boxes.append(_clip_box((q[1] - half, q[0] - half, q[1] + half, q[0] + half), shape))
        if len(pos_pts) > 1:
            ys = [q[0] for q in pos_pts]
            xs = [q[1] for q in pos_pts]
            boxes.append(_expand((min(xs), min(ys), max(xs), max(ys)), margin * 2, shape))
            union = np.zeros(shape, dtype=bool)
            for reg in regions:
                if not reg.leaked:
                    union |= reg.mask
            bb = clicks.mask_bbox(union)
            if bb is not None:
                boxes.append(_expand(bb, margin, shape))
        boxes = list(dict.fromkeys((round(b[0], 2), round(b[1], 2), round(b[2], 2), round(b[3], 2)) for b in boxes))
        masks, iou = self._decode(job, emb, np.array(boxes, dtype=np.float32), shape)
        masks, iou = masks[:, 0], iou[:, 0]

        # reference regions: per tolerance, the union over clicks of the regions that did not leak
        refs: list[np.ndarray] = []
        per_click = len(tols)
        for t in range(per_click):
            ref = np.zeros(shape, dtype=bool)
            for n in range(len(pos_pts)):
                reg = regions[n * per_click + t]
                if not reg.leaked:
                    ref |= reg.mask
            if int(ref.sum()) >= 4:
                refs.append(ref)

        scored = []
        enclosed = []
        for i in range(len(boxes)):
            m = masks[i]
            if not m.any() or not _satisfies(m, pos_pts, neg_pts):
                continue
            agree = max((clicks.dice(m, ref) for ref in refs), default=0.0)
            scored.append((float(iou[i]) + CLICK_AGREEMENT_WEIGHT * agree, i))
            if iou[i] >= CLICK_MIN_IOU and not _touches(m, boxes[i]):
                enclosed.append(scored[-1])
        if enclosed:
            # a box that holds the whole object (its mask does not reach the box's sides) is
            # preferred: a box cutting through an object makes SAM spill into its neighbours
            _, i = max(enclosed)
            logger.debug("click on slice %d: chose box %s (iou %.3f) of %d", k, boxes[i], iou[i], len(boxes))
            return masks[i], float(iou[i])
        if scored:
            _, i = max(scored)
            logger.debug("click on slice %d: chose box %s (iou %.3f) of %d", k, boxes[i], iou[i], len(boxes))
            return masks[i], float(iou[i])
        if len(pos_pts) > 1:
            # clicks on separate objects: one object per click, united
            mask = np.zeros(shape, dtype=bool)
            score = 1.0
            for q in pos_pts:
                m, s = self._click(job, k, emb, [q], neg_pts)
                mask |= m
                score = min(score, s)
            return mask, score
        # nothing valid: the grown region itself if it is plausible, else the best mask containing the click
        with_click = [i for i in range(len(boxes)) if _satisfies(masks[i], pos_pts, [])]
        if with_click:
            i = max(with_click, key=lambda j: iou[j])
            logger.warning("click on slice %d: every candidate contains a negative click; using box %s", k, boxes[i])
            return masks[i], float(iou[i])
        logger.warning("click on slice %d: no model output contains the click; using the grown region", k)
        fallback = refs[-1] if refs else np.zeros(shape, dtype=bool)
        return fallback, 0.0

    def _apply_negatives(
        self,
        job: _Job,
        k: int,
        emb: _Embedding,
        mask: np.ndarray,
        score: float,
        p: Prompts,
        pos_pts: list[tuple[int, int]],
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """Remove what negative points / boxes on slice ``k`` mark; returns (mask, removed, score)."""
        shape = mask.shape
        neg_pts = [clicks.pixel(q.x, q.y, shape) for q in p.points if not q.positive]
        neg_boxes = [_clip_box((b.x0, b.y0, b.x1, b.y1), shape) for b in p.boxes if not b.positive]
        removed = np.zeros(shape, dtype=bool)
        if neg_pts and mask.any():
            tol = clicks.removal_tolerance(job.slice_u8(k))
            removed = clicks.remove_marked(mask, job.slice_smoothed(k), neg_pts, pos_pts, tol)
            if removed.any():
                kept = clicks.drop_fragments(mask & ~removed, pos_pts)
                removed |= mask & ~kept & ~removed & _dilate(removed)
                bb = clicks.mask_bbox(kept)
                if bb is not None:
                    margin = CLICK_BOX_MARGIN / emb.scale
                    box = _expand(bb, margin, shape)
                    m2, s2 = self._decode(job, emb, np.array([box]), shape)
                    redo = m2[0, 0] & ~removed
                    if _satisfies(redo, pos_pts, neg_pts) and clicks.dice(redo, kept) >= 0.6:
                        kept, score = redo, float(s2[0, 0])
                mask = kept
        for x0, y0, x1, y1 in neg_boxes:
            region = np.zeros(shape, dtype=bool)
            region[int(np.floor(y0)) : int(np.ceil(y1)) + 1, int(np.floor(x0)) : int(np.ceil(x1)) + 1] = True
            removed |= mask & region
            mask = mask & ~region
        return mask, removed, score

    def _add_marked(
        self, job: _Job, out: np.ndarray, scores: dict[int, float], q: PointPrompt, tick: Callable[[], Any]
    ) -> None:
        """A positive correction click: add the object region it marks, keep the rest of ``out``.

        Inside the mask: nothing to do. On an empty slice, the chain from the nearest segmented
        slice is continued up to the click. Otherwise (or when that chain misses it) the object
        region around the click on its slice is added -- when the model's region adds more than
        :data:`CORRECTION_MAX_GROWTH` times the object's largest cross-section (it marks a
        neighbour), the intensity region grown from the click is added instead, if that one is
        small enough, so a click is not ignored. The added region is then carried to the
        neighbouring slices while it still changes them (Dice of before and after below
        :data:`CORRECTION_AGREEMENT`), by the usual stop rules, and while no slice gains more than
        that bound (or than the clicked slice gained), unless its intensity is unlike the object's.
        Masks are only ever united.
        """
        n_slices, h, w = out.shape
        j = q.k
        r, c = clicks.pixel(q.x, q.y, (h, w))
        if out[j, r, c]:
            return
        click = Prompts(points=(q,))
        # no slice may gain more than this from one correction (a larger region is a neighbour)
        largest = int(out.sum(axis=(1, 2)).max()) if out.any() else 0
        bound = CORRECTION_MAX_GROWTH * largest
        start: _SliceResult | None = None
        if not out[j].any():
            filled = np.flatnonzero(out.any(axis=(1, 2)))
            if filled.size:  # continue the nearest segmented slice's chain up to the click
                s = int(filled[np.argmin(np.abs(filled - j))])
                step = 1 if j > s else -1
                prev = _SliceResult(out[s].copy(), 1.0, np.zeros((h, w), bool),
                                    reference=_intensity(job.slice_u8(s), out[s]))
                for i in range(s + step, j + step, step):
                    tick()
                    res = self._propagate_slice(job, i, prev, click if i == j else Prompts(), must=True)
                    if res is None or int((res.mask & ~out[i]).sum()) > bound:
                        break
                    out[i] |= res.mask
                    scores[i] = max(scores.get(i, 0.0), res.score)
                    prev = start = res
                if start is not None and not out[j, r, c]:
                    start = None
        if start is None:  # the object region around the click itself, added to what is there
            start = self._segment_prompted_slice(job, j, click)
        if start is None or not start.mask.any():
            return
        if out.any() and int((start.mask & ~out[j]).sum()) > bound:
            # the model's region is far larger than the object: it marks a neighbour or spills
            # into one. The click still counts: the region grown from it by intensity is added
            # when it is small enough, so no click is ignored.
            grown = self._grown_region(job, j, (r, c), out[j], bound)
            logger.debug("positive click on slice %d: its region (%d px) is far larger than the object "
                         "(%d px per slice at most); %s", j, int(start.mask.sum()), largest,
                         "not added" if grown is None else f"its intensity region ({int(grown.sum())} px) added")
            if grown is None:
                return
            start = _SliceResult(grown, 0.0, np.zeros((h, w), bool), reference=None)
        filled = np.flatnonzero(out.any(axis=(1, 2)))
        anchor = int(filled[np.argmin(np.abs(filled - j))]) if filled.size else j
        reference = _intensity(job.slice_u8(anchor), out[anchor]) or start.reference
        out[j] |= start.mask
        scores[j] = max(scores.get(j, 0.0), start.score)
        if _drift(job.slice_u8(j), start.mask, reference) > self.settings.stop_intensity:
            return  # the click marks tissue unlike the object's: added on its slice only
        start = _SliceResult(start.mask, start.score, start.removed, reference=reference)
        # the carried correction may add per slice what its own slice accepted, or the bound
        bound = CORRECTION_MAX_GROWTH * max(largest, int(start.mask.sum()))
        for step in (-1, 1):
            prev, i = start, j + step
            while 0 <= i < n_slices and prev.mask.any():
                tick()
                res = self._propagate_slice(job, i, prev, Prompts())
                if res is None or clicks.dice(res.mask | out[i], out[i]) >= CORRECTION_AGREEMENT:
                    break  # the correction has faded out: what is there already agrees
                if largest and int((res.mask & ~out[i]).sum()) > bound:
                    break  # it would add more than the object's size: it has spilled into a neighbour
                out[i] |= res.mask
                scores[i] = max(scores.get(i, 0.0), res.score)
                prev, i = res, i + step

    def _grown_region(
        self, job: _Job, k: int, q: tuple[int, int], have: np.ndarray, bound: float
    ) -> np.ndarray | None:
        """The largest intensity region grown from ``q`` on slice ``k`` (at the click tolerances) that
        adds at most ``bound`` pixels to ``have`` and did not leak out of its window; None if none."""
        cap = max(4, int(round(CLICK_REGION_CAP / self._embedding(job, k).scale)))
        best: np.ndarray | None = None
        for tol in clicks.tolerances(job.slice_u8(k)):
            reg = clicks.grow_region(job.slice_smoothed(k), q, tol, cap_half=cap)
            if reg.leaked or int((reg.mask & ~have).sum()) > bound:
                break  # tolerances ascend: the next regions only grow
            best = reg.mask
        return best

    def _remove_marked(self, job: _Job, out: np.ndarray, q: PointPrompt, anchors: set[int], prompts: Prompts) -> None:
        """A negative correction click: remove the structure it marks, keep the rest of ``out``.

        On its slice, the part of the mask the click marks is removed (region grown from the
        click within the mask, kept away from positive clicks on that slice). The removal is then
        carried slice by slice away from the positively prompted slices (only where all of them
        lie on one side): on each next slice, mask components that overlap what was removed more
        than what was kept are removed too, so a leak is cut along its length while the object on
        the prompted side stays.
        """
        n_slices, h, w = out.shape
        j = q.k
        r, c = clicks.pixel(q.x, q.y, (h, w))
        if not out[j, r, c]:
            return
        pos = [clicks.pixel(p.x, p.y, (h, w)) for p in prompts.points if p.positive and p.k == j]
        core = _core(out[j])
        if core is not None and (core[0] - r) ** 2 + (core[1] - c) ** 2 > CORE_RADIUS ** 2:
            pos.append(core)  # the click marks the part of the mask on its side, not the object's middle
        tol = clicks.removal_tolerance(job.slice_u8(j))
        removed = clicks.remove_marked(out[j], job.slice_smoothed(j), [(r, c)], pos, tol)
        if not removed.any():
            return
        kept = clicks.drop_fragments(out[j] & ~removed, pos)
        removed = out[j] & ~kept
        out[j] = kept
        steps = []
        if not kept.any():
            pass  # the whole slice's mask was marked: only this slice (a chain of such removals is not local)
        elif anchors and j > max(anchors):
            steps = [1]
        elif anchors and j < min(anchors):
            steps = [-1]
        for step in steps:
            prev_kept, prev_removed, i = kept, removed, j + step
            while 0 <= i < n_slices and out[i].any():
                now = _drop_excluded(out[i], prev_kept, prev_removed)
                gone = out[i] & ~now
                if not gone.any():
                    break
                out[i] = now
                prev_kept, prev_removed, i = now, gone, i + step

    def _propagate_slice(
        self, job: _Job, j: int, prev: _SliceResult, p: Prompts, must: bool = False
    ) -> _SliceResult | None:
        """Segment slice ``j`` from the previous slice's mask; None when propagation must stop.

        Candidate boxes around the previous mask (its bounding box grown by ``box_margin`` and by
        :data:`PROPAGATION_GROWTH` of its size: an object can grow between slices, and a box that
        is too tight makes the mask shrink from slice to slice) are decoded in one call; the mask
        that best agrees with the previous one (predicted IoU + Dice) is kept. Positive clicks on
        the slice must be inside it (a box that also spans them is a candidate). Unless ``must``
        (a positive click lies ahead), the chain stops when the mask is empty, its predicted IoU
        is below ``stop_iou``, its Dice with the previous mask is below ``stop_overlap``, or its
        mean intensity left the object's (the chain's seed slice: mean ± ``stop_intensity``
        standard deviations).
        """
        shape = job.image.shape[1:]
        emb = self._embedding(job, j)
        bb = clicks.mask_bbox(prev.mask)
        assert bb is not None
        pos_pts = [clicks.pixel(q.x, q.y, shape) for q in p.points if q.positive]
        margin = self.settings.box_margin / emb.scale
        if pos_pts:
            ys = [q[0] for q in pos_pts]
            xs = [q[1] for q in pos_pts]
            bb = (min(bb[0], *xs), min(bb[1], *ys), max(bb[2], *xs), max(bb[3], *ys))
        boxes = _propagation_boxes(bb, margin, shape)
        masks, iou = self._decode(job, emb, np.array(boxes[:1], dtype=np.float32), shape)
        if _touches(masks[0, 0], boxes[0]):  # the object reaches past the box: try larger ones
            more, more_iou = self._decode(job, emb, np.array(boxes[1:], dtype=np.float32), shape)
            masks, iou = np.concatenate([masks, more]), np.concatenate([iou, more_iou])
        else:
            boxes = boxes[:1]
        best: tuple[float, np.ndarray, float] | None = None
        for i in range(len(boxes)):
            m = masks[i, 0]
            if not m.any() or not _satisfies(m, pos_pts, []):
                continue
            rank = float(iou[i, 0]) + clicks.dice(m, prev.mask)
            if best is None or rank > best[0]:
                best = (rank, m, float(iou[i, 0]))
        if best is not None:
            mask, score = best[1], best[2]
        elif pos_pts:  # no box around the previous mask reaches the click: the click decides
            neg_pts = [clicks.pixel(q.x, q.y, shape) for q in p.points if not q.positive]
            mask, score = self._click(job, j, emb, pos_pts, neg_pts)
        else:
            mask, score = masks[0, 0], float(iou[0, 0])
        dropped = np.zeros(shape, dtype=bool)
        if prev.removed.any() and mask.any():
            kept = _drop_excluded(mask, prev.mask, prev.removed)
            dropped, mask = mask & ~kept, kept
        overlap = clicks.dice(mask, prev.mask)
        drift = _drift(job.slice_u8(j), mask, prev.reference)
        s = self.settings
        grew = int(mask.sum()) / max(1, int(prev.mask.sum()))
        if not mask.any() or (not must and (
                score < s.stop_iou or overlap < s.stop_overlap or drift > s.stop_intensity
                or grew > PROPAGATION_MAX_GROWTH)):
            logger.debug("propagation stops at slice %d (iou %.3f, overlap %.3f, intensity %.2f sd, %d px)",
                         j, score, overlap, drift, int(mask.sum()))
            return None
        removed = dropped
        if p:  # negative prompts on a propagated slice
            mask, extra, score = self._apply_negatives(job, j, emb, mask, score, p, pos_pts)
            removed = removed | extra
            if not mask.any():
                return None
        return _SliceResult(mask=mask, score=score, removed=removed, reference=prev.reference)


def _run_chains(
    chains: list[tuple[int, int]], run: Callable[..., None], lanes: int
) -> None:
    """Run propagation chains on ``lanes`` threads, one decoder lane (half the threads) each.

    While two or more chains run, each thread's decoder calls go to its own lane (an ONNX Runtime
    session with half the threads: one box does not keep all the threads busy, two chains do);
    the last chain running uses the ordinary multi-threaded session again. The chains are
    independent (each starts from its seed's result and stops at other seeds), and results are
    united with ``|`` and ``max``, so the outcome does not depend on the order. The first error
    (e.g. a cancelled job) stops the other threads at their next slice and is raised here.
    """
    import torch

    pending = list(chains)
    lock = threading.Lock()
    active = 0
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        nonlocal active

        def lane() -> int | None:
            with lock:
                if errors:
                    raise _ChainStopped()
                return index if active > 1 else None

        with torch.inference_mode():
            while True:
                with lock:
                    if errors or not pending:
                        return
                    k, step = pending.pop(0)
                    active += 1
                try:
                    run(k, step, lane)
                except _ChainStopped:
                    return
                except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                    with lock:
                        errors.append(exc)
                    return
                finally:
                    with lock:
                        active -= 1

    threads = [threading.Thread(target=worker, args=(i,), name=f"propagate-{i}", daemon=True)
               for i in range(min(lanes, len(chains)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


class _ChainStopped(Exception):
    """Another propagation chain failed: this one stops at its next slice."""



def split_corrections(prompts: Prompts) -> tuple[Prompts, list[PointPrompt]]:
    """The prompts that define the object, and the correction clicks that follow, in order.

    The object is defined by every box and the clicks on the boxes' slices or, without a box, by
    the first positive click. Every other click is a correction,
    applied locally to the result in the order given (as a viewer sends them, prompts accumulate).
    """
    boxed = {b.k for b in prompts.boxes if b.positive}
    if boxed:
        return (Prompts(points=tuple(q for q in prompts.points if q.k in boxed), boxes=prompts.boxes),
                [q for q in prompts.points if q.k not in boxed])
    first = next((i for i, q in enumerate(prompts.points) if q.positive), None)
    if first is None:
        return prompts, []
    return (Prompts(points=(prompts.points[first],), boxes=prompts.boxes),
            [q for i, q in enumerate(prompts.points) if i != first])


def _propagation_boxes(
    bb: tuple[float, float, float, float], margin: float, shape: tuple[int, int]
) -> list[tuple[float, float, float, float]]:
    """Boxes tried on the next slice: ``bb`` grown by ``margin`` plus each of :data:`PROPAGATION_GROWTH`."""
    x0, y0, x1, y1 = bb
    out = []
    for f in (0.0, *PROPAGATION_GROWTH):
        mx, my = margin + f * (x1 - x0 + 1), margin + f * (y1 - y0 + 1)
        out.append(tuple(round(v, 2) for v in _clip_box((x0 - mx, y0 - my, x1 + mx, y1 + my), shape)))
    return out  # type: ignore[return-value]


def _core(mask: np.ndarray) -> tuple[int, int] | None:
    """(row, col) of the mask's innermost pixel (farthest from its border), or None when empty."""
    from scipy import ndimage

    if not mask.any():
        return None
    d = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    r, c = np.unravel_index(int(d.argmax()), d.shape)
    return int(r), int(c)


def _touches(mask: np.ndarray, box: tuple[float, float, float, float]) -> bool:
    """The mask reaches a side of the box that is not the image border."""
    bb = clicks.mask_bbox(mask)
    if bb is None:
        return False
    h, w = mask.shape
    x0, y0, x1, y1 = box
    return ((x0 > 0 and bb[0] <= x0 + 1) or (y0 > 0 and bb[1] <= y0 + 1)
            or (x1 < w - 1 and bb[2] >= x1 - 1) or (y1 < h - 1 and bb[3] >= y1 - 1))


def _intensity(u8: np.ndarray, mask: np.ndarray) -> tuple[float, float] | None:
    """Mean and standard deviation of the model input under a mask (None when empty)."""
    if not mask.any():
        return None
    v = u8[mask].astype(np.float32)
    return float(v.mean()), float(v.std())


def _drift(u8: np.ndarray, mask: np.ndarray, reference: tuple[float, float] | None) -> float:
    """How far the mask's mean intensity is from the reference mean, in reference standard deviations."""
    if reference is None or not mask.any():
        return 0.0
    mean, sd = reference
    return abs(float(u8[mask].mean()) - mean) / max(sd, INTENSITY_SD_FLOOR)


def _clip_box(box: tuple[float, float, float, float], shape: tuple[int, int]) -> tuple[float, float, float, float]:
    h, w = shape
    x0, y0, x1, y1 = box
    return (float(np.clip(x0, 0, w - 1)), float(np.clip(y0, 0, h - 1)),
            float(np.clip(x1, 0, w - 1)), float(np.clip(y1, 0, h - 1)))


def _expand(
    bb: tuple[float, float, float, float], margin: float, shape: tuple[int, int]
) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = bb
    return _clip_box((x0 - margin, y0 - margin, x1 + margin, y1 + margin), shape)


def _in_box(q: tuple[int, int], box: tuple[float, float, float, float]) -> bool:
    r, c = q
    return box[0] <= c <= box[2] and box[1] <= r <= box[3]


def _satisfies(mask: np.ndarray, pos: list[tuple[int, int]], neg: list[tuple[int, int]]) -> bool:
    return all(mask[q] for q in pos) and not any(mask[q] for q in neg)


def _dilate(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return np.asarray(ndimage.binary_dilation(mask, iterations=2), dtype=bool)


def _drop_excluded(mask: np.ndarray, prev_kept: np.ndarray, prev_removed: np.ndarray) -> np.ndarray:
    """Drop components that overlap what negatives removed on the previous slice more than what was kept."""
    from scipy import ndimage

    lab, n = ndimage.label(mask)
    out = mask.copy()
    for i in range(1, n + 1):
        comp = lab == i
        if int((comp & prev_removed).sum()) > int((comp & prev_kept).sum()):
            out &= ~comp
    return out
