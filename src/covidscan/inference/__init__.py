"""Inference: the one path from a trained model to class probabilities (docs/architecture.md).

``load_predictor(source)`` takes a run directory, a checkpoint, an ONNX export or an ensemble
directory and returns a :class:`Predictor`: 2D or 3D, PyTorch or ONNX Runtime, with the
preprocessing of training and optional test-time augmentation. Evaluation, batch prediction,
serving, explanation and export all go through it. ``predict_study(predictor, path)`` turns a
whole CT study (found and opened by :mod:`covidscan.data.studies`) into one :class:`StudyPrediction`.
"""

from covidscan.inference.card import ModelCard, file_sha256
from covidscan.inference.engines import METADATA_FORMAT, OnnxEngine, TorchEngine, metadata_path, read_export_metadata
from covidscan.inference.ensemble import ensemble_card, is_ensemble_dir, load_ensemble, make_ensemble
from covidscan.inference.predictor import (
    NON_FINITE_OUTPUT,
    ExplainUnavailable,
    Member,
    NonFiniteOutputError,
    Predictor,
    load_predictor,
)
from covidscan.inference.preprocessing import Preprocessing
from covidscan.inference.studies import AGGREGATIONS, ItemPrediction, StudyPrediction, aggregate, predict_study
from covidscan.inference.tta import DEFAULT_TTA, TTA_VIEWS, parse_tta
from covidscan.notices import RESEARCH_USE_NOTICE  # every verdict output carries it

__all__ = [
    "AGGREGATIONS",
    "DEFAULT_TTA",
    "METADATA_FORMAT",
    "NON_FINITE_OUTPUT",
    "RESEARCH_USE_NOTICE",
    "TTA_VIEWS",
    "ExplainUnavailable",
    "ItemPrediction",
    "Member",
    "ModelCard",
    "NonFiniteOutputError",
    "OnnxEngine",
    "Predictor",
    "Preprocessing",
    "StudyPrediction",
    "TorchEngine",
    "aggregate",
    "ensemble_card",
    "file_sha256",
    "is_ensemble_dir",
    "load_ensemble",
    "load_predictor",
    "make_ensemble",
    "metadata_path",
    "parse_tta",
    "predict_study",
    "read_export_metadata",
]
