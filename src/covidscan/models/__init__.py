"""Model registry (2D and 3D), heads, pretrained weights and freezing."""

from covidscan.models.base import ClassifierModel, keras_parameter_count
from covidscan.models.freezing import set_trainable
from covidscan.models.heads import HeadSpec
from covidscan.models.registry import (
    create_model,
    create_model_from_config,
    list_models,
    model_entry,
    register_model,
    unregister_model,
)
from covidscan.models.weights import PretrainedWeightsError

__all__ = [
    "ClassifierModel",
    "HeadSpec",
    "PretrainedWeightsError",
    "create_model",
    "create_model_from_config",
    "keras_parameter_count",
    "list_models",
    "model_entry",
    "register_model",
    "set_trainable",
    "unregister_model",
]
