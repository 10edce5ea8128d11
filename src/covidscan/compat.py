"""Make ``import torchvision`` work with a CPU-only torch whose torchvision extension cannot load.

torchvision 0.28.0, the only release paired with torch 2.13.0, ships a CUDA-built extension. With
the CPU torch that extension fails to load, and torchvision's import then dies registering fake
kernels for ``torchvision::nms`` / ``torchvision::qnms`` ("operator torchvision::nms does not
exist") - which also breaks timm and pytorch-grad-cam. Its pure-Python parts (models,
transforms.v2) are fine, so we define the missing operator schemas with ``torch.library`` before
the import, with a plain-torch NMS behind ``nms``. This runs only when the real extension is
absent: a machine where it loads keeps torchvision's own compiled ops.

Import this module (``covidscan`` does so on import) before anything that imports torchvision.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# Operators that torchvision's import touches unconditionally (its ``_meta_registrations``).
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}

_library: torch.library.Library | None = None  # kept alive: dropping it unregisters the ops
shim_active = False


def nms_reference(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression in plain torch (same contract as ``torchvision.ops.nms``)."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = scores.argsort(descending=True)
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    suppressed = torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
    keep = []
    for index in order.tolist():
        if suppressed[index]:
            continue
        keep.append(index)
        w = (torch.minimum(x2, x2[index]) - torch.maximum(x1, x1[index])).clamp(min=0)
        h = (torch.minimum(y2, y2[index]) - torch.maximum(y1, y1[index])).clamp(min=0)
        inter = w * h
        iou = inter / (areas + areas[index] - inter).clamp(min=torch.finfo(boxes.dtype).tiny)
        suppressed |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.int64, device=boxes.device)


def _quantized_nms_unavailable(dets: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    raise NotImplementedError(
        "torchvision::qnms needs torchvision's compiled extension, which does not load with this CPU torch"
    )


def _extension_loads() -> bool:
    """True when torchvision's compiled ops are (or can be) registered with this torch."""
    if hasattr(torch.ops, "torchvision") and hasattr(torch.ops.torchvision, "nms"):
        return True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return True  # torchvision absent: nothing to patch
    package_dir = Path(spec.origin).parent
    for library in sorted(package_dir.glob("_C*.so")) + sorted(package_dir.glob("_C*.pyd")):
        try:
            torch.ops.load_library(str(library))
        except (OSError, RuntimeError) as exc:
            logger.debug("torchvision extension %s does not load: %s", library, exc)
            return False
        return hasattr(torch.ops.torchvision, "nms")
    return False


def ensure_torchvision_importable() -> bool:
    """Register stand-in torchvision operator schemas if the compiled extension cannot load.

    Returns True when the shim was installed (now or earlier), False when the real ops are used.
    """
    global _library, shim_active
    if shim_active:
        return True
    if "torchvision" in sys.modules or _extension_loads():
        return False
    _library = torch.library.Library("torchvision", "DEF")
    for _name, schema in _SCHEMAS.items():
        _library.define(schema)
    _library.impl("nms", nms_reference, "CompositeExplicitAutograd")
    _library.impl("qnms", _quantized_nms_unavailable, "CompositeExplicitAutograd")
    shim_active = True
    logger.info("torchvision's compiled extension does not load with this torch; using covidscan's CPU shim")
    return True


ensure_torchvision_importable()
