"""Explainability: Grad-CAM, Grad-CAM++ and Smooth Grad-CAM++ for 2D and 3D models (docs/explain.md)."""

from covidscan.explain.cam import CAM_METHODS, CamMethod, CamResult, compute_cam, normalize_maps, resolve_target_layer
from covidscan.explain.explanation import Explanation, class_index, explain_files, explain_image
from covidscan.explain.overlay import render_montage, render_overlay

__all__ = [
    "CAM_METHODS",
    "CamMethod",
    "CamResult",
    "Explanation",
    "class_index",
    "compute_cam",
    "explain_files",
    "explain_image",
    "normalize_maps",
    "render_montage",
    "render_overlay",
    "resolve_target_layer",
]
