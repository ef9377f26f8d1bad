"""Image-encoder backends for LiteMedSAM (``litemedsam.encoder_backend`` / ``encoder_precision``).

Every backend is a callable ``encoder(x) -> embeddings`` that takes a float32 tensor
(N, 3, 256, 256) on the model's device and returns float32 embeddings (N, 256, 64, 64); N > 1
(batches of slices) works with every backend and on CUDA as on CPU.

Backends (figures: docs/models.md, ``benchmarks/encoder``):

``eager``
    The encoder module exactly as shipped (naive eager float32; the reference).
``fused``
    float32, eager, with every convolution + BatchNorm pair folded into one convolution and the
    tensors in channels-last layout. Same arithmetic up to float32 rounding (embeddings differ by
    ~1e-6, masks are identical); 1.3-1.6x faster than ``eager`` on a 2-core CPU.
``compile``
    ``fused`` compiled by ``torch.compile`` (TorchInductor): elementwise chains (GELU, residuals,
    layer norms) are fused into the matmul/convolution loops. float32 and exact (~1e-6). The first
    compile takes about a minute on a 2-core CPU (a few seconds when the Inductor cache is warm),
    so it runs in a background thread, started by the first encode (or :meth:`Encoder.start`),
    while ``fused`` answers; the switch happens when the compiled encoder is ready and agrees with
    ``fused`` on a probe input. Inductor caches where ``TORCHINDUCTOR_CACHE_DIR`` points: ``ainode serve``
    (:func:`node.service.serve`) sets it to ``<cache_dir>/inductor`` (a folder under its data dir), so
    restarts are warm; other processes keep Inductor's default unless they set it.
    The same thread then runs what :meth:`Encoder.then` registered (LiteMedSAM: the mask decoder's
    compile, :mod:`models.decoders`). Calls always hand the compiled graph an inference tensor of one
    slice, so no request ever triggers a recompile.
``onnx``
    ``fused`` exported to ONNX (~2 s; kept in ``<cache_dir>/onnx`` for the next load, :func:`cached_onnx`)
    and run by ONNX Runtime's CPU provider, float32 and exact
    (~3e-6); checked against ``fused`` on a probe input. On a 2-core CPU ~360 ms per slice against
    ~510 ms compiled and ~600 ms fused (the float32 FLOP floor), with nothing to compile. LiteMedSAM
    then runs its mask decoder on ONNX Runtime too (:meth:`models.decoders.BoxDecoder.use_onnx`).
``bf16``
    The whole encoder cast to bfloat16, channels-last (fastest on CPUs with AVX512-BF16/AMX, but
    masks differ from float32 on real images: Dice 0.93-0.98 on some boxes; opt-in).
``auto``
    ``onnx`` on a CPU when ONNX Runtime is installed; else ``compile`` on a CPU in a long-running
    node (``ainode serve`` calls :func:`enable_background_compile`) when a cache folder is known, and
    ``fused`` otherwise (one-shot CLI commands, embedded use, CUDA).

A backend that fails to build or to run falls back to ``fused`` and then to ``eager``, logged once
(``encoder.backend`` then names the backend actually running).
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

logger = logging.getLogger(__name__)

#: Values of ``litemedsam.encoder_backend``.
BACKENDS = ("auto", "eager", "fused", "compile", "onnx", "bf16")
#: The float32 ones (``litemedsam.encoder_backend``; bf16 is chosen by ``litemedsam.encoder_precision``).
FP32_BACKENDS = ("auto", "eager", "fused", "compile", "onnx")
#: Largest |difference| a compiled float32 encoder may show against ``fused`` on the probe input.
PROBE_TOLERANCE = 1e-3

_background_compile = False
_compile_threads: list[threading.Thread] = []


def enable_background_compile(on: bool = True) -> None:
    """Let ``auto`` choose ``compile`` (long-running processes only: ``ainode serve``).

    A one-shot command would pay the compile's CPU time and could exit while the compile thread is
    still inside native code, so without this call ``auto`` means ``fused``.
    """
    global _background_compile
    _background_compile = on


def compiling() -> bool:
    """True while a background compile thread of this process is running."""
    return any(t.is_alive() for t in _compile_threads)


def native_bf16(device: torch.device) -> bool:
    """True when ``device`` is a CPU whose oneDNN kernels run bfloat16 natively (AVX512-BF16 / AMX)."""
    import torch

    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - torch builds without oneDNN
        return False


def fuse_conv_bn(encoder: Any) -> Any:
    """A copy of ``encoder`` with each TinyViT ``Conv2d_BN`` (conv + eval BatchNorm) folded into one conv."""
    import torch

    fused = copy.deepcopy(encoder).eval()
    for module in list(fused.modules()):
        for name, child in list(module.named_children()):
            if _is_conv_bn(child):
                conv = child.fuse()
                conv.to(device=child.c.weight.device, dtype=child.c.weight.dtype)
                setattr(module, name, conv.eval())
    # eval-mode TinyViT attention keeps a precomputed bias table ("ab"); deepcopy keeps it.
    return fused.to(memory_format=torch.channels_last)


def _is_conv_bn(module: Any) -> bool:
    import torch

    return (
        isinstance(module, torch.nn.Sequential)
        and callable(getattr(module, "fuse", None))
        and isinstance(getattr(module, "c", None), torch.nn.Conv2d)
        and isinstance(getattr(module, "bn", None), torch.nn.BatchNorm2d)
    )


class Encoder:
    """The image encoder behind one backend, with its fallbacks (see the module docstring).

    Parameters
    ----------
    encoder
        The float32 TinyViT image encoder (``net.image_encoder``), already on ``device``.
    backend
        One of :data:`BACKENDS`.
    device
        Torch device the encoder runs on.
    cache_dir
        Folder for compiled artefacts (the Inductor cache); None: no persistent cache, and ``auto``
        does not compile.
    background
        ``compile`` only: build in a background thread (True) or before returning (False).
    """

    def __init__(
        self,
        encoder: Any,
        backend: str = "auto",
        device: torch.device | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        background: bool = True,
    ) -> None:
        import torch

        if backend not in BACKENDS:
            raise ValueError(f"encoder backend must be one of {', '.join(BACKENDS)}; got {backend!r}.")
        self._eager = encoder
        self._device = device or next(encoder.parameters()).device
        self._cache_dir = Path(cache_dir) if cache_dir else None
        #: Folder of compiled artefacts and cached ONNX exports (None: nothing is kept).
        self.cache_dir = self._cache_dir
        if backend == "auto":
            if self._device.type == "cpu" and onnxruntime_available():
                backend = "onnx"
            else:
                backend = ("compile" if _background_compile and self._device.type == "cpu"
                           and self._cache_dir is not None else "fused")
        #: The backend asked for (``auto`` resolved).
        self.requested = backend
        #: The backend currently answering (differs from :attr:`requested` while compiling or after a fallback).
        self.backend = "eager"
        #: Why the requested backend is not (or not yet) answering; empty when it is.
        self.status = ""
        #: Seconds the background compile took (None until it finished).
        self.compile_seconds: float | None = None
        self._lock = threading.Lock()
        self._fn: Any = encoder
        self._fused: Any = None
        self._thread: threading.Thread | None = None
        self._warned = False
        self._then: list[Any] = []
        if backend == "eager":
            return
        try:
            self._fused = fuse_conv_bn(encoder)
        except Exception as exc:  # noqa: BLE001 - any build failure falls back, logged
            self._fail(f"folding conv+BatchNorm failed ({type(exc).__name__}: {exc})", "fused")
            return
        self._set("fused", self._fused)
        if backend == "bf16":
            if self._device.type == "cpu" and not native_bf16(self._device):
                logger.warning("encoder backend 'bf16' requested, but this CPU has no native bfloat16: it will be slow")
            bf = copy.deepcopy(self._fused).to(dtype=torch.bfloat16)

            def run_bf16(x: torch.Tensor) -> torch.Tensor:
                out: torch.Tensor = bf(x.to(torch.bfloat16, memory_format=torch.channels_last)).float()
                return out

            self._set("bf16", run_bf16)
        elif backend == "onnx":
            self._build_onnx()
        elif backend == "compile":
            if background:
                self.status = "compile starts with the first encode"
                self._thread = threading.Thread(target=self._compile, name="encoder-compile", daemon=True)
                _compile_threads.append(self._thread)
            else:
                self.status = "compiling"
                self._compile()

    # ------------------------------------------------------------------ calls

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings (N, 256, 64, 64) float32 of a float32 batch (N, 3, 256, 256)."""
        import torch

        self.start()
        with self._lock:
            fn, name = self._fn, self.backend
        x = x.float().contiguous(memory_format=torch.channels_last)
        try:
            out: torch.Tensor = fn(x).float().contiguous()
            return out
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failing backend falls back, logged once
            if name == "eager":
                raise
            self._fail(f"backend '{name}' failed on a batch of {x.shape[0]} ({type(exc).__name__}: {exc})", name)
            return self(x)

    def start(self) -> None:
        """Start the background compile now (otherwise the first encode starts it); idempotent."""
        with self._lock:
            thread = self._thread
            if thread is None or thread.is_alive() or thread.ident is not None:
                return
            self.status = "compiling"
            thread.start()

    def then(self, fn: Any) -> bool:
        """Run ``fn()`` in the background compile thread once the encoder compiled (the decoder's compile).

        Returns False (and never calls ``fn``) when this encoder does not compile in the background.
        """
        with self._lock:
            if self._thread is None or self._thread.ident is not None:
                return False
            self._then.append(fn)
            return True

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait for a started background compile; True when the requested backend answers."""
        if self._thread is not None and self._thread.ident is not None:
            self._thread.join(timeout)
        return self.backend == self.requested

    def describe(self) -> str:
        """``backend`` plus, when it differs from the request, why (for logs and /v1 info)."""
        if self.backend == self.requested:
            return self.backend
        return f"{self.backend} ({self.requested}: {self.status})"

    # ------------------------------------------------------------------ internals

    def _set(self, name: str, fn: Any) -> None:
        with self._lock:
            self._fn, self.backend = fn, name

    def _fail(self, why: str, failed: str = "fused") -> None:
        """Step down from the backend that ``failed`` (compile/bf16 -> fused -> eager); log it once."""
        with self._lock:
            if failed == "fused" or self._fused is None:
                self._fn, self.backend = self._eager, "eager"
            else:
                self._fn, self.backend = self._fused, "fused"
            self.status = why
            first = not self._warned
            self._warned = True
        if first:
            logger.warning("LiteMedSAM encoder: %s; falling back to '%s'", why, self.backend)
        else:
            logger.debug("LiteMedSAM encoder: %s; falling back to '%s'", why, self.backend)

    def _build_onnx(self) -> None:
        """Export the fused encoder and open it in ONNX Runtime (float32, CPU); checked on the probe."""
        import torch

        t0 = time.perf_counter()
        try:
            import numpy as np
            import onnxruntime as ort

            def build(graphs: dict[str, bytes], reference: Any) -> tuple[Any, float]:
                session = ort_session(graphs["encoder"], torch.get_num_threads())

                def run_onnx(x: torch.Tensor) -> torch.Tensor:
                    arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)  # NCHW
                    return torch.from_numpy(session.run(None, {"x": arr})[0])

                probe = _probe_input(self._device)
                with torch.inference_mode():
                    got = run_onnx(probe)
                    want, = reference("encoder-probe", [probe], lambda: [
                        self._fused(probe.contiguous(memory_format=torch.channels_last))])
                diff = float((got.float() - want.to(got.device).float()).abs().max())
                if not diff <= PROBE_TOLERANCE:
                    raise RuntimeError(
                        f"the ONNX Runtime encoder differs from float32 by {diff:.3g} on the probe input")
                return run_onnx, diff

            run_onnx, diff = build_cached(self._cache_dir, {"encoder": lambda: export_onnx(self._fused)},
                                          [self._fused], build)
        except Exception as exc:  # noqa: BLE001 - any build failure falls back, logged once
            self._fail(f"ONNX Runtime failed ({brief(exc)})", "onnx")
            return
        self._set("onnx", run_onnx)
        self.status = ""
        logger.info("LiteMedSAM encoder on ONNX Runtime %s in %.1f s (max |diff| vs float32 %.2g)",
                    ort.__version__, time.perf_counter() - t0, diff)

    def _compile(self) -> None:
        self._compile_encoder()
        if self.backend != "compile":
            return  # Inductor does not work here (logged); the followers would fail the same way
        self._run_then()

    def _use_inductor_cache(self) -> None:
        if self._cache_dir is not None:
            # the folder `ainode serve` points Inductor at (TORCHINDUCTOR_CACHE_DIR, set by the entry point
            # only: it is process-wide); an unusable cache folder stops the compile here, before it starts
            (self._cache_dir / "inductor").mkdir(parents=True, exist_ok=True)

    def _run_then(self) -> None:
        for fn in self._then:
            try:
                fn()
            except Exception:  # noqa: BLE001 - a follower's failure must not end the thread unlogged
                logger.exception("background compile step after the encoder failed")

    def _compile_encoder(self) -> None:
        import torch

        t0 = time.perf_counter()
        try:
            self._use_inductor_cache()
            compiled: Callable[[torch.Tensor], torch.Tensor] = torch.compile(self._fused, dynamic=False)

            def run_compiled(x: torch.Tensor) -> torch.Tensor:
                # one static shape (a single slice) and always inference mode: callers with other
                # batch sizes or grad modes never trigger a recompile on their thread
                with torch.inference_mode():
                    # one layout and tensor kind for the probe and every request: never a recompile
                    x = x.contiguous(memory_format=torch.channels_last)
                    if not x.is_inference():
                        x = x.clone()
                    if x.shape[0] == 1:
                        return compiled(x)
                    return torch.cat([compiled(x[i : i + 1]) for i in range(x.shape[0])])

            probe = _probe_input(self._device)
            with torch.inference_mode():
                got = run_compiled(probe)
                want = self._fused(probe)
            diff = float((got.float() - want.float()).abs().max())
            if not diff <= PROBE_TOLERANCE:
                raise RuntimeError(f"compiled encoder differs from float32 by {diff:.3g} on the probe input")
        except Exception as exc:  # noqa: BLE001 - any compile failure falls back, logged once
            self._fail(f"torch.compile failed ({brief(exc)})", "compile")
            return
        self.compile_seconds = time.perf_counter() - t0
        self.status = ""
        self._set("compile", run_compiled)
        logger.info("LiteMedSAM encoder compiled in %.1f s (max |diff| vs float32 %.2g)", self.compile_seconds, diff)


def brief(exc: BaseException) -> str:
    """``Type: first line of the message`` (compiler and runtime errors run to pages) for one-line logs."""
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def onnxruntime_available() -> bool:
    """True when ONNX Runtime and the ONNX exporter's ``onnx`` package can be imported."""
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None


#: Part of the key of cached ONNX exports: bump it when the exported graphs change for the same weights.
ONNX_EXPORT_VERSION = 1


def weights_digest(modules: list[Any]) -> str:
    """sha256 of every parameter and buffer of ``modules`` (names and bytes), with the torch version."""
    import hashlib

    import torch

    digest = hashlib.sha256(torch.__version__.encode())
    for module in modules:
        for key, tensor in module.state_dict().items():
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _write_atomically(path: Path, write: Any) -> None:
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cached_onnx(cache_dir: Path | None, name: str, modules: list[Any], export: Any,
                weights: str | None = None) -> tuple[bytes, Path | None]:
    """``export()`` (ONNX bytes), kept in ``cache_dir/onnx`` so the next model load skips the export.

    The file name carries a digest of ``name``, :data:`ONNX_EXPORT_VERSION`, the torch and onnx versions
    and every parameter and buffer of ``modules`` (``weights``: their :func:`weights_digest`, when the
    caller has it already); other exports of the same ``name`` are removed when a new one is written.
    Returns the bytes and the cached file they came from (None: exported now). Callers check what they
    load against eager on a probe and call again after deleting the file when that fails, so a damaged
    or stale file costs one export, never a wrong result.
    """
    if cache_dir is None:
        return export(), None
    import hashlib

    import onnx

    weights = weights or weights_digest(modules)
    digest = hashlib.sha256(f"{name}|{ONNX_EXPORT_VERSION}|{onnx.__version__}|{weights}".encode())
    folder = Path(cache_dir) / "onnx"
    path = folder / f"{name}-{digest.hexdigest()[:24]}.onnx"
    try:
        return path.read_bytes(), path
    except OSError:
        pass
    data = export()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomically(path, lambda tmp: tmp.write_bytes(data))
        for old in folder.glob(f"{name}-*.onnx"):
            if old != path:
                old.unlink(missing_ok=True)
    except OSError as exc:
        logger.warning("LiteMedSAM: the ONNX export cannot be cached in %s (%s); it is exported at every load",
                       folder, exc)
    return data, None


def cached_reference(cache_dir: Path | None, name: str, weights: str, inputs: list[torch.Tensor],
                     compute: Any) -> list[torch.Tensor]:
    """``compute()`` (eager outputs on a probe's ``inputs``), kept in ``cache_dir/onnx`` as ``<name>-<key>.ref.npz``.

    A model load checks its ONNX Runtime sessions against eager on a fixed probe; eager takes about a
    second of that load (the image encoder's forward on the CPU). Its outputs depend only on the weights,
    the torch version and the probe, so the next load compares against the stored ones instead. The key
    is a digest of ``name``, ``weights`` (:func:`weights_digest`) and the inputs' bytes; each array is
    stored with its CRC-32 and a file that does not read back exactly is computed again (and replaced).
    """
    if cache_dir is None:
        return list(compute())
    import hashlib
    import zlib

    import numpy as np
    import torch

    digest = hashlib.sha256(f"{name}|{weights}".encode())
    for t in inputs:
        digest.update(str(tuple(t.shape)).encode())
        digest.update(zlib.crc32(t.detach().cpu().contiguous().numpy().tobytes()).to_bytes(4, "little"))
    folder = Path(cache_dir) / "onnx"
    path = folder / f"{name}-{digest.hexdigest()[:24]}.ref.npz"
    try:
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:
            arrays = [z[f"a{i}"] for i in range(int(z["n"]))]
            if [zlib.crc32(a.tobytes()) for a in arrays] == [int(c) for c in z["crc"]]:
                return [torch.from_numpy(a.copy()) for a in arrays]
        logger.warning("LiteMedSAM: probe reference %s is damaged; computing it again", path.name)
    except FileNotFoundError:
        pass
    except Exception as exc:  # noqa: BLE001 - any unreadable file is computed again
        logger.warning("LiteMedSAM: probe reference %s unreadable (%s); computing it again", path.name, brief(exc))
    outputs = list(compute())
    arrays = [o.detach().cpu().contiguous().numpy() for o in outputs]
    try:
        folder.mkdir(parents=True, exist_ok=True)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, n=np.int64(len(arrays)), crc=np.array([zlib.crc32(a.tobytes()) for a in arrays],
                                                                  dtype=np.int64),
                         **{f"a{i}": a for i, a in enumerate(arrays)})

        _write_atomically(path, write)
        for old in folder.glob(f"{name}-*.ref.npz"):
            if old != path:
                old.unlink(missing_ok=True)
    except OSError as exc:
        logger.warning("LiteMedSAM: the probe reference cannot be cached in %s (%s)", folder, exc)
    return outputs


def build_cached(cache_dir: Path | None, exports: dict[str, Any], modules: list[Any], build: Any) -> Any:
    """``build({name: graph}, reference)`` on the cached exports (:func:`cached_onnx`, one per ``exports``
    entry), where ``reference(name, inputs, compute)`` is :func:`cached_reference` for these weights; when
    ``build`` fails on cached files (damaged or stale), they and the cached references are deleted and
    ``build`` runs on fresh exports against freshly computed references. Returns what ``build`` returns."""
    weights = weights_digest(modules) if cache_dir is not None else ""
    used: list[str] = []

    def reference(name: str, inputs: list[Any], compute: Any) -> list[Any]:
        used.append(name)
        return cached_reference(cache_dir, name, weights, inputs, compute)

    def load() -> tuple[dict[str, bytes], list[Path]]:
        graphs, cached = {}, []
        for name, export in exports.items():
            graphs[name], path = cached_onnx(cache_dir, name, modules, export, weights=weights)
            if path is not None:
                cached.append(path)
        return graphs, cached

    graphs, cached = load()
    if not cached:
        return build(graphs, reference)
    try:
        return build(graphs, reference)
    except Exception as exc:  # noqa: BLE001 - retried once on fresh exports
        logger.warning("LiteMedSAM: cached ONNX %s unusable (%s); cached ONNX export(s) %s deleted, exporting again",
                       " + ".join(exports), brief(exc), ", ".join(p.name for p in cached))
        for path in cached:
            path.unlink(missing_ok=True)
        for name in used:  # the references sit beside the cached exports
            for old in cached[0].parent.glob(f"{name}-*.ref.npz"):
                old.unlink(missing_ok=True)
        graphs, _ = load()
        return build(graphs, reference)


def ort_session(graph: bytes, threads: int) -> Any:
    """An ONNX Runtime CPU session for ``graph`` with ``threads`` intra-op threads that do not spin when idle
    (the next call, or torch, needs the cores)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])


def export_onnx(fused: Any) -> bytes:
    """The conv+BN-folded float32 encoder as an ONNX model (in memory; ~2 s), batch dimension dynamic."""
    import io
    import warnings

    import torch

    model = copy.deepcopy(fused).to(memory_format=torch.contiguous_format).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # the TorchScript-based exporter warns that it is deprecated in favour of the dynamo one, which
        # needs onnxscript and is slower to export; the graph and the numbers are the same
        warnings.simplefilter("ignore")
        # the TorchScript exporter (dynamo=False) writes to a file object; torch annotates ``f`` with paths only
        torch.onnx.export(model, (torch.zeros(1, 3, 256, 256),), buf, dynamo=False, opset_version=17,  # type: ignore[arg-type]
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    return buf.getvalue()


def _probe_input(device: torch.device) -> torch.Tensor:
    """A deterministic image-like input (smooth gradient + disc) for the compiled-vs-eager check."""
    import torch

    yy, xx = torch.meshgrid(torch.linspace(0, 1, 256), torch.linspace(0, 1, 256), indexing="ij")
    img = 0.5 * xx + 0.3 * yy + 0.4 * (((xx - 0.5) ** 2 + (yy - 0.45) ** 2) < 0.05).float()
    img = (img - img.min()) / (img.max() - img.min())
    return img.expand(1, 3, 256, 256).contiguous().to(device)
