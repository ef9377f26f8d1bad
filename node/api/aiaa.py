"""The NVIDIA Clara AIAA v1 subset the XNAT OHIF viewer calls: /v1/models, /v1/segmentation, /v1/deepgrow, /v1/dextr3d.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from node.api.core import ApiContext, ApiError, bad
from node.api.monailabel import ModelEntry, MonaiLabelApi

logger = logging.getLogger(__name__)

#: Suffix of the AIAA ``annotation`` (DEXTR3D, extreme points) variant of a model.
ANNOTATION_SUFFIX = "_annotation"


class AiaaApi:
    """AIAA v1 endpoints, answered by the same queues and sessions as the MONAI Label ones."""

    def __init__(self, ctx: ApiContext, monai: MonaiLabelApi) -> None:
        self.ctx = ctx
        self.monai = monai

    def model_list(self) -> list[dict[str, Any]]:
        """AIAA model descriptions (plus ``modes``/``loaded``/``device``/``default`` for native clients)."""
        s = self.ctx.settings
        status = self.ctx.inference.status()
        labels = [s.seg.label]
        out: list[dict[str, Any]] = []
        for name, e in self.monai.entries().items():
            st = status.get(e.model, {})
            common = {"labels": labels, "version": st.get("version") or "", "padding": 20.0, "roi": [128, 128, 128],
                      "model": e.model, "modes": [e.mode], "loaded": bool(st.get("loaded")),
                      "device": st.get("device"), "default": name == s.model.default}
            out.append({"name": name, "description": e.description, "type": "deepgrow",
                        "deepgrow": "2D" if e.mode == "2d" else "3D", **common})
            if name == e.model:
                out.append({"name": name + ANNOTATION_SUFFIX, "type": "annotation",
                            "description": f"{e.model}: 3D segmentation from extreme points (DEXTR3D)", **common})
        return out

    async def models(self, request: Request) -> Response:
        q = request.query_params
        models = self.model_list()
        if q.get("model"):
            models = [m for m in models if m["name"] == q["model"]]
        if q.get("label"):
            models = [m for m in models if q["label"] in m["labels"]]
        if q.get("type"):
            models = [m for m in models if m["type"] == q["type"]]
        return JSONResponse(models)

    def _entry(self, request: Request) -> ModelEntry:
        name = request.query_params.get("model")
        if not name:
            raise bad("model", "the query parameter model=<name> is required (see GET /v1/models).")
        base = name[: -len(ANNOTATION_SUFFIX)] if name.endswith(ANNOTATION_SUFFIX) else name
        try:
            return self.monai.entry(base)
        except ApiError as exc:
            raise ApiError(404, f"model: '{name}' is unknown; see GET /v1/models.", "model") from exc

    async def segmentation(self, request: Request) -> Response:
        return await self.monai.run_infer(request, self._entry(request), aiaa="segmentation")

    async def deepgrow(self, request: Request) -> Response:
        return await self.monai.run_infer(request, self._entry(request), aiaa="deepgrow")

    async def dextr3d(self, request: Request) -> Response:
        return await self.monai.run_infer(request, self._entry(request), aiaa="dextr3d")

    async def inference(self, request: Request) -> Response:
        return await self.monai.run_infer(request, self._entry(request), aiaa="inference")

    def routes(self) -> list[Route]:
        return [
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/segmentation", self.segmentation, methods=["POST"]),
            Route("/v1/deepgrow", self.deepgrow, methods=["POST"]),
            Route("/v1/dextr3d", self.dextr3d, methods=["POST"]),
            Route("/v1/inference", self.inference, methods=["POST"]),
        ]


__all__ = ["ANNOTATION_SUFFIX", "AiaaApi"]
