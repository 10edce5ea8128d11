"""The shape every registry model shares: a feature-map backbone followed by a classifier head.

Keeping the split explicit gives one place for everything that differs between studies: freezing
("train the head only", "unfreeze the last N layers"), the head variant (GAP vs Flatten, study E's
dense head), and the Grad-CAM target (the backbone's last feature map) for 2D and 3D alike.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@runtime_checkable
class L2Regularized(Protocol):
    """A layer that adds a Keras-style L2 term to the loss (``kernel_regularizer``)."""

    def l2_penalty(self) -> torch.Tensor: ...


class ClassifierModel(nn.Module):
    """``logits = head(backbone(x))``; ``backbone`` returns a (N, C, *spatial) feature map."""

    def __init__(
        self, backbone: nn.Module, head: nn.Module, *, spatial_dims: int = 2, cam_target: nn.Module | None = None
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.backbone = backbone
        self.head = head
        self.spatial_dims = spatial_dims
        # default CAM target: the module producing the backbone's final feature map
        self._cam_target_name = _module_name(self, cam_target) if cam_target is not None else "backbone"

    @property
    def cam_target(self) -> nn.Module:
        return self.get_submodule(self._cam_target_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def train(self, mode: bool = True) -> ClassifierModel:
        """Like ``nn.Module.train``, but frozen BatchNorm layers stay in inference mode (Keras semantics)."""
        super().train(mode)
        if mode:
            from covidscan.models.freezing import freeze_norm_stats

            freeze_norm_stats(self)
        return self

    def l2_penalty(self) -> torch.Tensor:
        """Sum of the per-layer L2 terms (Keras ``kernel_regularizer``) the trainer adds to the loss.

        Layers opt in by defining ``l2_penalty()`` (e.g. study E's Dense 1024 with L2 0.01); the
        result is a zero tensor when none do, so ``loss + model.l2_penalty()`` is always valid.
        """
        terms = [m.l2_penalty() for m in self.modules() if m is not self and isinstance(m, L2Regularized)]
        if not terms:
            return torch.zeros((), device=next(self.parameters()).device)
        return torch.stack(terms).sum()


def keras_parameter_count(model: nn.Module) -> int:
    """The "Total params" Keras' ``model.summary()`` prints for the same network.

    Keras counts every weight, trainable or not, including BatchNorm's moving mean and variance
    (4 numbers per channel); PyTorch keeps those two as buffers, so they are added here.
    """
    params = sum(p.numel() for p in model.parameters())
    moving = sum(
        buffer.numel()
        for m in model.modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats
        for buffer in (m.running_mean, m.running_var)
        if buffer is not None
    )
    return params + moving


def _module_name(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise ValueError("cam_target must be a submodule of the model")
