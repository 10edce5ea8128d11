"""3D registry models (study C): build, train a step, expose the CAM target, load local weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from covidscan.models import create_model, list_models


def first_conv(model: nn.Module) -> nn.Conv3d:
    return next(m for m in model.backbone.modules() if isinstance(m, nn.Conv3d))


MODELS_3D = ["r2plus1d_18", "r2plus1d_34", "resnet3d_18", "resnet3d_34", "resnet3d_50"]


def test_study_c_models_are_registered_as_3d() -> None:
    # other tests may register extra models: the built-ins must be there, and 3D only
    assert set(MODELS_3D) <= set(list_models(spatial_dims=3))
    assert not set(MODELS_3D) & set(list_models(spatial_dims=2))


@pytest.mark.parametrize("name", MODELS_3D)
def test_forward_backward_on_a_tiny_stack(name: str) -> None:
    model = create_model(name, num_classes=3, in_channels=1)
    x = torch.randn(2, 1, 4, 32, 32)
    logits = model(x)
    assert logits.shape == (2, 3) and model.spatial_dims == 3
    logits.sum().backward()
    stem = first_conv(model)
    assert stem.weight.grad is not None and stem.weight.grad.abs().sum() > 0
    assert model.cam_target is model.backbone.layer4
    features = model.backbone(x)
    assert features.ndim == 5 and features.shape[0] == 2


def test_table3_stem_keeps_depth_and_halves_the_plane() -> None:
    for name in ("resnet3d_18", "r2plus1d_18"):
        model = create_model(name, num_classes=3, in_channels=3).eval()
        stem = first_conv(model)
        assert stem.stride == (1, 2, 2) and stem.kernel_size == (7, 7, 7) and stem.in_channels == 3
        with torch.no_grad():
            assert stem(torch.zeros(1, 3, 2, 32, 32)).shape[2:] == (2, 16, 16)


def test_pretrained_is_refused_and_local_weights_load(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pretrained"):
        create_model("resnet3d_18", num_classes=3, pretrained=True)
    source = create_model("resnet3d_18", num_classes=3, in_channels=1)
    path = tmp_path / "backbone.pt"
    torch.save(source.backbone.state_dict(), path)
    loaded = create_model("resnet3d_18", num_classes=3, in_channels=1, weights=str(path))
    assert torch.equal(loaded.backbone.layer4[0].conv1.weight, source.backbone.layer4[0].conv1.weight)


def test_every_3d_model_ends_on_the_same_feature_map_shape() -> None:
    """Table 3 puts a 3x3x3 max-pool (stride 2) after the stem of every model, R(2+1)D included."""
    x = torch.zeros(1, 1, 16, 32, 32)
    shapes = {}
    for name in MODELS_3D:
        model = create_model(name, num_classes=3, in_channels=1).eval()
        with torch.no_grad():
            shapes[name] = tuple(model.backbone(x).shape[2:])
    # stem conv (1, 2, 2) + max-pool 2 + three stride-2 stages: depth / 16, side / 32 (without the
    # pool, R(2+1)D ended on (2, 1, 1) here)
    assert set(shapes.values()) == {(1, 1, 1)}, shapes
    pools = [m for m in create_model("r2plus1d_18", num_classes=3).backbone.stem if isinstance(m, nn.MaxPool3d)]
    assert len(pools) == 1 and pools[0].kernel_size == 3 and pools[0].stride == 2
