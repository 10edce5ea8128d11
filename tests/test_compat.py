"""The torchvision shim: imports work, NMS is correct, and installing it twice is harmless."""

from __future__ import annotations

import torch

from covidscan import compat


def brute_force_nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> list[int]:
    """Independent greedy NMS on Python floats: keep the best box, drop boxes overlapping a kept one."""

    def iou(a, b):
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = w * h
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union

    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    kept: list[int] = []
    for i in order:
        if all(iou(boxes[i].tolist(), boxes[k].tolist()) <= threshold for k in kept):
            kept.append(i)
    return kept


def random_boxes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    corner = torch.rand(n, 2, generator=generator) * 100
    size = torch.rand(n, 2, generator=generator) * 40 + 1
    return torch.cat([corner, corner + size], dim=1), torch.rand(n, generator=generator)


def test_torchvision_imports_and_its_python_parts_work():
    import torchvision
    from torchvision.transforms import v2

    model = torchvision.models.resnet18(weights=None, num_classes=2).eval()
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 2)
    assert v2.Resize((8, 8), antialias=True)(torch.rand(1, 16, 16)).shape == (1, 8, 8)


def test_nms_op_matches_brute_force_reference():
    import torchvision  # noqa: F401  (the op must survive torchvision's import-time registrations)

    for seed, threshold in [(0, 0.5), (1, 0.3), (2, 0.7), (3, 0.0)]:
        boxes, scores = random_boxes(80, seed)
        expected = brute_force_nms(boxes, scores, threshold)
        assert torch.ops.torchvision.nms(boxes, scores, threshold).tolist() == expected
    assert torch.ops.torchvision.nms(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0


def test_ensure_importable_is_idempotent():
    first = compat.ensure_torchvision_importable()
    assert compat.ensure_torchvision_importable() == first
    assert hasattr(torch.ops.torchvision, "nms")
    # with the op registered (shim or real extension) the loader reports it as present, so a second
    # process-level install would be skipped rather than redefining the schema
    assert compat._extension_loads()
