"""Built-in registry entries. Importing this module registers them."""

from __future__ import annotations

from torch import nn

from covidscan.models.base import ClassifierModel
from covidscan.models.registry import register_model


def _conv_stack(in_channels: int, widths: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        in_channels = width
    return nn.Sequential(*layers)


@register_model("cnn1", description="Study A CNN1: 3x (conv3x3 + ReLU + maxpool) 32-64-128, GAP, dense 128, dropout 0.5")
def cnn1(num_classes: int, in_channels: int = 3, pretrained: bool = False, weights: str | None = None) -> nn.Module:
    backbone = _conv_stack(in_channels, (32, 64, 128))
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 128), nn.ReLU(inplace=True),
                         nn.Dropout(0.5), nn.Linear(128, num_classes))
    return ClassifierModel(backbone, head)
