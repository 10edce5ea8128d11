"""Serving: HTTP API + web page, batch prediction to CSV, ONNX / TorchScript export.

Models are loaded through the one inference path, ``covidscan.inference`` (``load_predictor``,
``ModelCard`` and ``Predictor`` are re-exported here for existing callers). Heavy optional
dependencies (FastAPI, ONNX Runtime) are imported only by the modules that need them.
"""

from covidscan.inference import ModelCard, Predictor, load_predictor
from covidscan.optional import optional_import
from covidscan.serving.export import ExportResult, export_model
from covidscan.serving.predict import PredictSummary, StudySummary, predict_files, predict_studies
from covidscan.serving.upload import UploadError, UploadLimits, decode_upload


def create_app(*args, **kwargs):
    """See :func:`covidscan.serving.app.create_app` (imported lazily: FastAPI is an optional extra)."""
    for module in ("fastapi", "python_multipart"):  # what covidscan.serving.app needs from the serve extra
        optional_import(module, extra="serve")
    from covidscan.serving.app import create_app as _create_app

    return _create_app(*args, **kwargs)


__all__ = [
    "ExportResult",
    "ModelCard",
    "PredictSummary",
    "Predictor",
    "StudySummary",
    "UploadError",
    "UploadLimits",
    "create_app",
    "decode_upload",
    "export_model",
    "load_predictor",
    "predict_files",
    "predict_studies",
]
