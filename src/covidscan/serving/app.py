"""The HTTP API and web page: ``create_app(checkpoint)`` -> a FastAPI app (``covidscan serve``).

The model is loaded once, when the app is created. Decoding runs in worker threads; inference and
Grad-CAM share one capacity limiter because they run the same module (CAM hooks must not see
another request's forward pass) and two parallel forward passes on a CPU only fight for its cores.
Every refusal is a 4xx with ``{"error": code, "detail": message}``; the server keeps serving.
"""

from __future__ import annotations

import logging
import tempfile
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any, cast

import anyio
import numpy as np
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from covidscan import __version__
from covidscan.errors import UsageError
from covidscan.explain import CAM_METHODS, CamMethod, explain_image
from covidscan.inference import RESEARCH_USE_NOTICE, NonFiniteOutputError, Predictor, load_predictor
from covidscan.serving.studies import StudyStore
from covidscan.serving.study_routes import study_router
from covidscan.serving.study_upload import StudyLimits
from covidscan.serving.upload import (
    DecodedImage,
    UploadError,
    UploadLimits,
    decode_upload,
    require_explainable,
    to_png,
)

log = logging.getLogger(__name__)
STATIC_DIR = Path(str(resources.files("covidscan.serving") / "static"))
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers around the file in a multipart body
EXAMPLE_UPLOADS = {
    "/v1/predict": "slice.png",
    "/v1/explain": "slice.png",
    "/v1/preview": "slice.dcm",
    "/v1/studies": "study.zip",
}


@dataclass
class ServedModel:
    """What the app holds between requests."""

    predictor: Predictor  # with a PyTorch model for Grad-CAM unless serving an ONNX export alone
    limiter: anyio.CapacityLimiter

    def predict(self, pixels: np.ndarray, filename: str) -> np.ndarray:
        """Class probabilities for one decoded image; a 3D model or a non-finite output is a 4xx."""
        if self.predictor.spatial_dims != 2:
            raise UploadError(
                409, "needs_study", "the served model is 3D (slice stacks): send a whole study, not one image"
            )
        try:
            return self.predictor.predict_pixels(pixels)
        except NonFiniteOutputError:
            raise UploadError(
                422,
                "non_finite_output",
                f"{filename}: the model's output is not finite (NaN/inf pixels or rescale values in the file?); "
                "no label is given. Check the file",
            ) from None


def create_app(
    checkpoint: str | Path | None = None,
    *,
    onnx: str | Path | None = None,
    limits: UploadLimits = UploadLimits(),
    study_limits: StudyLimits = StudyLimits(),
    threads: int | None = None,
) -> FastAPI:
    """An app serving ``checkpoint`` (PyTorch) or ``onnx`` (ONNX Runtime; Grad-CAM still uses the
    checkpoint when both are given). The model is loaded here, so a bad model file fails fast."""
    if checkpoint is None and onnx is None:
        raise UsageError("create_app needs a checkpoint (run directory or .pt) or an exported .onnx model")

    # Loaded here, not in the lifespan: a missing, truncated or foreign model file is then a one-line
    # error from `covidscan serve` (the CLI prints it) instead of a server traceback at start-up.
    predictor = load_predictor(checkpoint, onnx, threads=threads)
    log.info("serving %s (%s, version %s)", predictor.card.model_id, predictor.engine, predictor.card.version)

    store = StudyStore(Path(tempfile.mkdtemp(prefix="covidscan-studies-")))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        store.close()  # kept studies never outlive the server

    app = FastAPI(
        title="covidscan",
        version=__version__,
        lifespan=lifespan,
        description="COVID-19 classification of chest CT / X-ray images. Research use only — not a diagnosis.",
    )
    app.state.served = ServedModel(predictor, anyio.CapacityLimiter(1))
    _install_error_handlers(app)

    _install_body_limits(app, lambda path: study_limits.max_upload_bytes if path == "/v1/studies" else limits.max_bytes)

    async def read_upload(request: Request, file: UploadFile) -> DecodedImage:
        data = await file.read(limits.max_bytes + 1)
        served: ServedModel = request.app.state.served
        return await anyio.to_thread.run_sync(
            partial(
                decode_upload,
                data,
                filename=file.filename or "upload",
                content_type=file.content_type,
                limits=limits,
                window=served.predictor.config.data.window,
            )
        )

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/healthz", summary="Liveness: the model is loaded")
    async def healthz(request: Request) -> dict[str, str]:
        return {"status": "ok", "model_id": request.app.state.served.predictor.card.model_id}

    @app.get("/v1/model", summary="The served model: classes, input size, version, training metrics")
    async def model_info(request: Request) -> dict[str, Any]:
        served: ServedModel = request.app.state.served
        return {
            **served.predictor.card.to_dict(),
            "engine": served.predictor.engine,
            "explain_available": served.predictor.explainable,
            "limits": {
                "max_upload_bytes": limits.max_bytes,
                "max_pixels": limits.max_pixels,
                "max_study_upload_bytes": study_limits.max_upload_bytes,
                "max_study_decompressed_bytes": study_limits.max_decompressed_bytes,
                "max_study_slices": study_limits.max_slices,
            },
        }

    @app.post("/v1/predict", summary="Class probabilities for one PNG, JPEG or DICOM image")
    async def predict(
        request: Request, file: UploadFile = File(..., description="PNG, JPEG or DICOM")
    ) -> dict[str, Any]:
        served: ServedModel = request.app.state.served
        start = time.perf_counter()
        image = await read_upload(request, file)
        decoded = time.perf_counter()
        probabilities = await anyio.to_thread.run_sync(
            served.predict, image.pixels, file.filename or "upload", limiter=served.limiter
        )
        done = time.perf_counter()
        card = served.predictor.card
        return {
            "predicted_label": card.class_names[int(np.argmax(probabilities))],
            "probabilities": {name: float(p) for name, p in zip(card.class_names, probabilities)},
            "model_id": card.model_id,
            "model_version": card.version,
            "engine": served.predictor.engine,
            "warnings": [RESEARCH_USE_NOTICE],
            "image": {"format": image.format, "height": image.pixels.shape[0], "width": image.pixels.shape[1]},
            "timing_ms": {
                "decode": round(1000 * (decoded - start), 2),
                "inference": round(1000 * (done - decoded), 2),
                "total": round(1000 * (done - start), 2),
            },
        }

    @app.post(
        "/v1/explain",
        summary="Grad-CAM heatmap overlaid on the image (PNG)",
        responses={200: {"content": {"image/png": {}}}},
    )
    async def explain(
        request: Request,
        file: UploadFile = File(..., description="PNG, JPEG or DICOM"),
        method: str = Query("gradcam", description="gradcam, gradcampp or smoothgradcampp"),
        target: str | None = Query(None, description="class to explain (default: the predicted one)"),
    ) -> Response:
        served: ServedModel = request.app.state.served
        require_explainable(served.predictor)
        if method not in CAM_METHODS:
            raise UploadError(400, "invalid_argument", f"method must be one of {list(CAM_METHODS)}, got {method!r}")
        if target is not None and target not in served.predictor.card.class_names:
            raise UploadError(
                400, "invalid_argument", f"target must be one of {served.predictor.card.class_names}, got {target!r}"
            )
        image = await read_upload(request, file)
        explanation = await anyio.to_thread.run_sync(
            partial(explain_image, served.predictor, image.pixels, method=cast(CamMethod, method), target_class=target),
            limiter=served.limiter,
        )
        return Response(
            explanation.overlay_png_bytes,
            media_type="image/png",
            headers={"X-Model-Version": served.predictor.card.version, "X-Predicted-Label": explanation.predicted},
        )

    @app.post(
        "/v1/preview",
        summary="The decoded (CT-windowed) image as PNG, e.g. to show a DICOM in a browser",
        responses={200: {"content": {"image/png": {}}}},
    )
    async def preview(request: Request, file: UploadFile = File(..., description="PNG, JPEG or DICOM")) -> Response:
        image = await read_upload(request, file)
        return Response(await anyio.to_thread.run_sync(to_png, image.pixels), media_type="image/png")

    app.include_router(study_router(study_limits, store))
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


class BodyTooLarge(Exception):
    """Raised while receiving a body (e.g. chunked, without Content-Length) that passed its limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body exceeds the {limit / 2**20:.1f} MB limit")
        self.limit = limit


class CountedBodyLimit:
    """ASGI middleware counting request body bytes as they arrive: a chunked upload has no
    Content-Length to check up front, so it is stopped once it passes its path's limit."""

    def __init__(self, app, limit_for) -> None:
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit + MULTIPART_OVERHEAD:
                raise BodyTooLarge(limit)
            return message

        await self.app(scope, counted, send)


def _too_large(exc: BaseException | None) -> JSONResponse | None:
    """The 413 for a body stopped by :class:`CountedBodyLimit`, however the framework wrapped it."""
    while exc is not None and not isinstance(exc, BodyTooLarge):
        exc = exc.__cause__ or exc.__context__
    return _error(413, "upload_too_large", f"{exc}; send a smaller file") if exc is not None else None


def _error(status: int, code: str, detail: Any) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status)


def _how_to_send(request: Request) -> str:
    """The one-line recipe for a correct request to this endpoint."""
    path = request.url.path
    example = EXAMPLE_UPLOADS.get(path)
    if example:
        return f"send the file as the multipart form field `file`, e.g. curl -F file=@{example} {request.url}"
    return f"see {request.base_url}docs for the endpoints and their parameters"


def _install_body_limits(app: FastAPI, limit_for) -> None:
    """413 before parsing: from Content-Length when given, else by counting the body as it arrives."""
    app.add_middleware(CountedBodyLimit, limit_for=limit_for)

    @app.middleware("http")
    async def refuse_oversized_bodies(request: Request, call_next):
        length = request.headers.get("content-length")
        limit = limit_for(request.url.path)
        if length and length.isdigit() and int(length) > limit + MULTIPART_OVERHEAD:
            return _error(
                413,
                "upload_too_large",
                f"request body of {int(length) / 2**20:.1f} MB exceeds the {limit / 2**20:.1f} MB limit",
            )
        return await call_next(request)


def _install_error_handlers(app: FastAPI) -> None:
    """One JSON error shape for everything: refusals, validation errors, unknown routes, bugs.

    An unexpected exception becomes a 500 inside the app (a middleware, not an exception handler,
    so it does not propagate to the ASGI server): the server logs it and the connection stays usable.
    """

    @app.exception_handler(UploadError)
    async def upload_error(request: Request, exc: UploadError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.detail)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(tuple(e.get("loc", ())) == ("body", "file") for e in errors):
            return _error(422, "missing_file", f"no `file` field in the multipart form; {_how_to_send(request)}")
        problems = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in errors]
        return _error(422, "invalid_request", f"{'; '.join(problems) or 'invalid request'}; {_how_to_send(request)}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if too_large := _too_large(exc):
            return too_large
        docs = f"see {request.base_url}docs for the endpoints"
        if exc.status_code == 404:
            return _error(404, "not_found", f"no such endpoint: {request.method} {request.url.path}; {docs}")
        if exc.status_code == 405:
            allowed = exc.headers.get("Allow", "") if exc.headers else ""
            return _error(
                405,
                "method_not_allowed",
                f"{request.url.path} takes {allowed or 'another method'}, not {request.method}; {docs}",
            )
        return _error(exc.status_code, "http_error", exc.detail)

    @app.middleware("http")
    async def contain_unexpected_errors(request: Request, call_next):
        try:
            return await call_next(request)
        except Exception as exc:
            if too_large := _too_large(exc):
                return too_large
            log.exception("unhandled error on %s %s", request.method, request.url.path)
            return _error(
                500,
                "internal_error",
                f"{type(exc).__name__} while handling the request (a covidscan bug: see the server log)",
            )
