"""Which parameters train in a phase: ``set_trainable(model, "all" | "head" | "last:N")``.

Studies D and E fine-tune ImageNet backbones the Keras way: freeze the convolutional base and train
the new head (``"head"``), then unfreeze the last N layers at a lower learning rate (``"last:N"``).

What a "layer" is
    A *layer* is a module that directly owns parameters (convolution, BatchNorm, linear, ...),
    counted in registration order, which is forward order up to the place of a residual block's
    shortcut convolution (timm lists it first; it belongs to the same block either way). Keras also
    counts parameter-free layers (ReLU, ZeroPadding, Add, MaxPool), so Keras' "last 150 layers"
    of ResNet101V2 is the same cut point as ``"last:81"`` here: both start at the third convolution
    of the 13th-from-last block of stage 4 and include everything after it (see docs/models.md).

Frozen BatchNorm
    A BatchNorm layer whose parameters are all frozen runs in inference mode (running statistics
    used, not updated), as Keras does for ``trainable=False``. ``ClassifierModel.train()`` applies
    this automatically after every ``model.train()`` call, so the trainer needs no extra step; a
    plain ``nn.Module`` can call :func:`freeze_norm_stats` itself after ``model.train()``.
"""

from __future__ import annotations

import warnings

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from covidscan.config import ConfigError


def parameter_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The module's "layers": submodules owning parameters directly, in registration order."""
    return [(name, sub) for name, sub in module.named_modules() if any(True for _ in sub.parameters(recurse=False))]


def parse_trainable(spec: str) -> int | None:
    """``"all"`` -> None (everything), ``"head"`` -> 0, ``"last:N"`` -> N backbone layers."""
    if spec == "all":
        return None
    if spec == "head":
        return 0
    if spec.startswith("last:") and spec[5:].isdigit():
        return int(spec[5:])
    raise ConfigError(f"trainable spec must be 'all', 'head' or 'last:N' (N >= 0), got {spec!r}")


def set_trainable(model: nn.Module, spec: str) -> int:
    """Set ``requires_grad`` per ``spec`` on a ``ClassifierModel``; return the trainable parameter count.

    ``"all"`` trains everything; ``"head"`` freezes the backbone; ``"last:N"`` also trains the last N
    backbone layers (see the module docstring for what counts as a layer). Call ``model.train()``
    afterwards (the trainer does each epoch) so frozen BatchNorm layers switch to inference mode.
    """
    n_layers = parse_trainable(spec)
    if n_layers is None:
        model.requires_grad_(True)
    else:
        if not hasattr(model, "backbone") or not hasattr(model, "head"):
            raise ValueError(
                f"trainable {spec!r} needs a model with .backbone and .head "
                f"(a covidscan ClassifierModel), got {type(model).__name__}"
            )
        model.requires_grad_(False)
        model.head.requires_grad_(True)
        layers = parameter_layers(model.get_submodule("backbone"))
        if n_layers > len(layers):
            warnings.warn(
                f"trainable {spec!r}: the backbone has only {len(layers)} layers with parameters; training all of them",
                stacklevel=2,
            )
        for _, layer in layers[len(layers) - min(n_layers, len(layers)) :]:
            layer.requires_grad_(True)
    if model.training:
        freeze_norm_stats(model)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def freeze_norm_stats(model: nn.Module) -> None:
    """Put BatchNorm layers whose parameters are all frozen into eval mode (Keras semantics).

    BatchNorm layers without affine parameters have nothing to freeze and are left as they are.
    """
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()
