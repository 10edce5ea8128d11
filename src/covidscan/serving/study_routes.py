"""``/v1/studies``: a whole CT study in (zip of a DICOM series, or NIfTI), one verdict out.

The upload is stored with every limit checked (:mod:`covidscan.serving.study_upload`), then predicted
by :func:`covidscan.inference.predict_study`, the same study path as ``covidscan predict``. The answer
is :meth:`StudyPrediction.to_dict` (study probabilities, the aggregation rule, per-slice or per-stack
probabilities, series metadata with patient identifiers only when ``include_identifiers=true``, model
provenance, the research-use warning), named after the uploaded file rather than the server's folder.
With ``keep=true`` the study stays on the server briefly (:class:`~covidscan.serving.studies.StudyStore`)
for the viewer: slices in a CT window and the Grad-CAM heatmap of a chosen slice (a 3D model's
whole-scan map, computed once per study, method and class, cut at that slice).
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any, cast

import anyio
import numpy as np
from fastapi import APIRouter, File, Query, Request, UploadFile
from fastapi.responses import Response

from covidscan.data import LUNG_WINDOW, DataError
from covidscan.explain import CAM_METHODS, CamMethod, explain_image
from covidscan.inference import AGGREGATIONS, Predictor, StudyPrediction, predict_study
from covidscan.serving.studies import StudySlices, StudyStore, gray_png, heatmap_png, window_by_name
from covidscan.serving.study_upload import StudyLimits, cleanup, store_study, study_refusal
from covidscan.serving.upload import UploadError, require_explainable

STUDY_SUFFIXES = (".nii.gz", ".nii", ".zip")


def study_answer(prediction: StudyPrediction, filename: str) -> dict[str, Any]:
    """The JSON answer: the prediction's own form, naming the upload (never a server path)."""
    answer = prediction.to_dict()
    name = Path(filename).name
    stem = next((name[: -len(s)] for s in STUDY_SUFFIXES if name.lower().endswith(s)), name)
    return {**answer, "study": name, "name": stem}


def _predict(
    predictor: Predictor, folder: Path, scan: Path, filename: str, options: dict[str, Any]
) -> tuple[StudyPrediction, StudySlices]:
    try:
        prediction = predict_study(predictor, scan, **options)
        return prediction, StudySlices(prediction, scan, predictor.config.data.limits)
    except DataError as exc:  # NonFiniteOutputError included: no verdict is given
        raise study_refusal(exc, folder, filename) from None


def study_router(limits: StudyLimits, store: StudyStore) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/studies", summary="Study verdict for a zip of a DICOM series or a NIfTI volume")
    async def post_study(
        request: Request,
        file: UploadFile = File(
            ..., description="zip of a DICOM study (several series: the axial CT one is used), .nii or .nii.gz"
        ),
        aggregation: str = Query("mean", description="mean, max or topk (mean of the top_k highest per class)"),
        top_k: int = Query(5, ge=1, description="k for aggregation=topk"),
        every: int = Query(1, ge=1, description="2D models: predict every k-th slice"),
        include_identifiers: bool = Query(False, description="echo patient identifiers from the DICOM headers"),
        keep: bool = Query(False, description="keep the study on the server for the viewer (slices, CAM)"),
    ) -> dict[str, Any]:
        if aggregation not in AGGREGATIONS:
            raise UploadError(
                400, "invalid_argument", f"aggregation must be one of {list(AGGREGATIONS)}, got {aggregation!r}"
            )
        served = request.app.state.served
        filename = file.filename or "upload"
        start = time.perf_counter()
        folder = store.new_folder()
        options = {"aggregation": aggregation, "top_k": top_k, "every": every}
        try:
            stored_study = await anyio.to_thread.run_sync(partial(store_study, file.file, filename, folder, limits))
            scan = stored_study.path
            stored = time.perf_counter()
            prediction, slices = await anyio.to_thread.run_sync(
                partial(
                    _predict,
                    served.predictor,
                    folder,
                    scan,
                    filename,
                    {**options, "include_identifiers": include_identifiers},
                ),
                limiter=served.limiter,
            )
        except BaseException:
            cleanup(folder)
            raise
        done = time.perf_counter()
        answer = {
            **study_answer(prediction, filename),
            "skipped_files": stored_study.skipped,
            "timing_ms": {"upload": round(1000 * (stored - start), 2), "predict": round(1000 * (done - stored), 2)},
        }
        if keep:
            answer["study_id"] = store.keep(folder, slices, answer)
        else:
            cleanup(folder)
        return answer

    @router.get("/v1/studies/{study_id}", summary="The answer for a kept study")
    async def get_study(study_id: str) -> dict[str, Any]:
        return store.get(study_id).answer

    @router.delete("/v1/studies/{study_id}", summary="Delete a kept study now")
    async def delete_study(study_id: str) -> dict[str, Any]:
        return {"deleted": store.delete(study_id)}

    @router.get(
        "/v1/studies/{study_id}/slices/{index}",
        summary="One slice of a kept study as PNG, in a CT window",
        responses={200: {"content": {"image/png": {}}}},
    )
    async def get_slice(study_id: str, index: int, window: str = Query("lung", description="lung or mediastinal")):
        slices = store.get(study_id).slices
        window_config = window_by_name(window)
        png = await anyio.to_thread.run_sync(lambda: gray_png(slices.windowed(index, window_config)))
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=600"})

    @router.get(
        "/v1/studies/{study_id}/slices/{index}/cam",
        summary="Grad-CAM heatmap of one slice of a kept study (RGBA PNG to lay over the slice)",
        responses={200: {"content": {"image/png": {}}}},
    )
    async def get_cam(
        request: Request,
        study_id: str,
        index: int,
        method: str = Query("gradcam", description="gradcam, gradcampp or smoothgradcampp"),
        target: str | None = Query(None, description="class to explain (default: the predicted class)"),
    ):
        served = request.app.state.served
        predictor = served.predictor
        require_explainable(predictor)
        if method not in CAM_METHODS:
            raise UploadError(400, "invalid_argument", f"method must be one of {list(CAM_METHODS)}, got {method!r}")
        if target is not None and target not in predictor.class_names:
            raise UploadError(400, "invalid_argument", f"target must be one of {predictor.class_names}, got {target!r}")
        stored = store.get(study_id)
        slices = stored.slices
        window = predictor.members[0].preprocessing.window or LUNG_WINDOW  # as predict_study reads slices
        pixels = await anyio.to_thread.run_sync(slices.windowed, index, window)
        if predictor.spatial_dims == 3:
            # the whole-scan map (every stack, stitched), computed once per study, method and class
            key = (method, target)
            explanation = stored.scan_cams.get(key)
            if explanation is None:
                explanation = await anyio.to_thread.run_sync(
                    partial(explain_image, predictor, slices.scan, method=cast(CamMethod, method), target_class=target),
                    limiter=served.limiter,
                )
                stored.scan_cams[key] = explanation
            cam = scan_map_slice(explanation.map, index, slices.count)
        else:
            explanation = await anyio.to_thread.run_sync(
                partial(explain_image, predictor, pixels, method=cast(CamMethod, method), target_class=target),
                limiter=served.limiter,
            )
            cam = explanation.map
        png = await anyio.to_thread.run_sync(heatmap_png, cam, pixels.shape)
        return Response(png, media_type="image/png", headers={"X-Predicted-Label": explanation.predicted})

    return router


def scan_map_slice(scan_map: np.ndarray, index: int, slices: int) -> np.ndarray:
    """The plane of a 3D model's (D', S, S) whole-scan map that covers slice ``index`` of the study's
    ``slices``: D' differs from the slice count when the pipeline resamples along z."""
    return scan_map[min(scan_map.shape[0] - 1, int((index + 0.5) * scan_map.shape[0] / slices))]
