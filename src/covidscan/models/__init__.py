"""Model registry (2D and 3D), heads, pretrained weights and freezing."""

from covidscan.models.base import ClassifierModel
from covidscan.models.registry import create_model, list_models, model_entry, register_model

__all__ = ["ClassifierModel", "create_model", "list_models", "model_entry", "register_model"]
