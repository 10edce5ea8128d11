"""Built-in 3D registry entries (study C): 3D ResNets and R(2+1)D. Importing registers them.

Input is a ``(N, C, D, H, W)`` slice stack. Every model starts with study C's Table-3 stem: one
7x7x7 convolution with stride 1 across slices and 2 in-plane (64 filters), so thin stacks (depth
2 or 4) keep their slices through the convolution, then the 3x3x3 max-pool with stride 2 that
Table 3 puts after it in every model. All five models therefore end on the same feature-map
shape for a given input (e.g. (1, 2, 2) for a 16x64x64 stack).

- ``resnet3d_18/34/50``: MONAI's ``ResNet`` (basic blocks [2,2,2,2] / [3,4,6,3], bottleneck
  [3,4,6,3]) with ``conv1_t_size=7, conv1_t_stride=1``; MONAI keeps the 3x3x3 max-pool after it.
- ``r2plus1d_18/34``: torchvision's ``VideoResNet`` with ``Conv2Plus1D`` blocks ([2,2,2,2] is
  torchvision's ``r2plus1d_18``; [3,4,6,3] is the 34-layer variant built from the same blocks),
  its (2+1)D stem (which has no max-pool) replaced by the Table-3 stem with its max-pool.

No pretrained 3D weights are fetched (Kinetics / MedicalNet weights need a download and a matching
stem); ``weights=PATH`` loads a local state dict into the backbone. Options (``model.kwargs``):
``head`` / ``dropout`` / ``hidden`` as for the 2D models (average pooling only).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from torch import nn

from covidscan import compat  # noqa: F401  (torchvision needs the shim on a CPU-only torch)
from covidscan.config import ConfigError
from covidscan.models.base import ClassifierModel
from covidscan.models.heads import HeadSpec, build_head, resolve_head
from covidscan.models.registry import register_model
from covidscan.models.weights import load_backbone_state, read_weights_file

STEM_WIDTH = 64
_RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")


def table3_stem(in_channels: int) -> nn.Sequential:
    """Study C's first layers: conv 7x7x7, stride (1, 2, 2), 64 filters, BatchNorm, ReLU, then the
    3x3x3 max-pool with stride 2 (padding 1, as MONAI's 3D ResNet has it)."""
    return nn.Sequential(
        nn.Conv3d(in_channels, STEM_WIDTH, kernel_size=7, stride=(1, 2, 2), padding=3, bias=False),
        nn.BatchNorm3d(STEM_WIDTH),
        nn.ReLU(inplace=True),
        nn.MaxPool3d(kernel_size=3, stride=2, padding=1),
    )


def _monai_resnet(in_channels: int, block: str, layers: list[int]) -> tuple[nn.Module, int]:
    from monai.networks.nets.resnet import ResNet, get_inplanes

    net = ResNet(
        block=block,
        layers=layers,
        block_inplanes=get_inplanes(),
        spatial_dims=3,
        n_input_channels=in_channels,
        conv1_t_size=7,
        conv1_t_stride=(1, 2, 2),  # type: ignore[arg-type]  # one stride per axis; MONAI annotates tuple[int]
        feed_forward=False,
    )
    parts = ["conv1", "bn1", "act", "maxpool", *_RESNET_STAGES]
    backbone = nn.Sequential(OrderedDict(zip(parts, (getattr(net, name) for name in parts))))
    return backbone, net.in_planes


def _video_resnet(in_channels: int, layers: list[int]) -> tuple[nn.Module, int]:
    from torchvision.models.video.resnet import BasicBlock, Conv2Plus1D, VideoResNet

    net = VideoResNet(
        block=BasicBlock, conv_makers=[Conv2Plus1D] * 4, layers=layers, stem=lambda: table3_stem(in_channels)
    )
    parts = ["stem", *_RESNET_STAGES]
    backbone = nn.Sequential(OrderedDict(zip(parts, (getattr(net, name) for name in parts))))
    return backbone, net.inplanes


BackboneFactory = Callable[[int], tuple[nn.Module, int]]  # in_channels -> (backbone, feature channels)


def _register(name: str, description: str, make_backbone: BackboneFactory) -> None:
    """Register ``name``; the shared builder adds the head, local weights and the CAM target."""

    @register_model(name, spatial_dims=3, description=description, input_size=128)
    def builder(
        num_classes: int,
        in_channels: int = 3,
        pretrained: bool = False,
        weights: str | None = None,
        head: str = "default",
        dropout: float | None = None,
        hidden: list[int] | None = None,
    ) -> nn.Module:
        if pretrained:
            raise ConfigError(
                f"{name}: no pretrained 3D weights are available offline; set model.pretrained=false "
                "(or give a local state dict with model.weights=PATH)"
            )
        backbone, channels = make_backbone(in_channels)
        if weights:
            load_backbone_state(backbone, read_weights_file(weights), source=str(weights))
        spec = resolve_head(head, HeadSpec(), dropout=dropout, hidden=hidden)
        if spec.pooling != "avg":
            raise ConfigError(f"{name}: 3D models use average pooling; head {head!r} asks for {spec.pooling!r}")
        head_module = build_head(spec, (channels, 1, 1, 1), num_classes)
        return ClassifierModel(backbone, head_module, spatial_dims=3, cam_target=backbone.get_submodule("layer4"))


_register(
    "resnet3d_18",
    "Study C 3D ResNet-18 (MONAI, basic blocks [2,2,2,2]), Table-3 stem",
    lambda c: _monai_resnet(c, "basic", [2, 2, 2, 2]),
)
_register(
    "resnet3d_34",
    "Study C 3D ResNet-34 (MONAI, basic blocks [3,4,6,3]), Table-3 stem",
    lambda c: _monai_resnet(c, "basic", [3, 4, 6, 3]),
)
_register(
    "resnet3d_50",
    "Study C 3D ResNet-50 (MONAI, bottleneck blocks [3,4,6,3]), Table-3 stem",
    lambda c: _monai_resnet(c, "bottleneck", [3, 4, 6, 3]),
)
_register(
    "r2plus1d_18",
    "Study C R(2+1)D-18 (torchvision VideoResNet, Conv2Plus1D [2,2,2,2]), Table-3 stem",
    lambda c: _video_resnet(c, [2, 2, 2, 2]),
)
_register(
    "r2plus1d_34",
    "Study C R(2+1)D-34 (torchvision VideoResNet, Conv2Plus1D [3,4,6,3]), Table-3 stem",
    lambda c: _video_resnet(c, [3, 4, 6, 3]),
)
