"""Classifier heads as the studies built them: pooling, dense blocks, dropout, BatchNorm, L2.

A head maps the backbone's feature map to logits. The variants differ only in a few choices, so one
:class:`HeadSpec` describes them all and :func:`build_head` turns it into modules:

- pooling ``"avg"`` (GlobalAveragePooling) or ``"flatten"`` (Keras ``Flatten``; needs the feature
  map's size, i.e. the input size, known when the model is built: ``data.image_size`` from a config);
- hidden dense layers (ReLU), each followed by Dropout and/or BatchNorm in either order (study B:
  Dense-Dropout-BN, study E: Dense-BN-Dropout);
- a Keras-style L2 kernel penalty on the hidden dense layers, read by the trainer through
  ``ClassifierModel.l2_penalty()`` (added to the loss, as Keras adds ``kernel_regularizer`` terms).

The head always ends in a plain linear layer producing logits: softmax vs sigmoid is the loss's job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, cast

import torch
from torch import nn

from covidscan.config import ConfigError
from covidscan.errors import UsageError

Pooling = Literal["avg", "flatten"]


@dataclass(frozen=True)
class HeadSpec:
    """One head variant; see the module docstring for the meaning of each field."""

    pooling: Pooling = "avg"
    hidden: tuple[int, ...] = ()
    dropout: float = 0.0
    batch_norm: bool = False
    norm_before_dropout: bool = False  # study E order (Dense-BN-Dropout) vs study B (Dense-Dropout-BN)
    l2: float = 0.0  # Keras L2 factor on the hidden dense kernels: l2 * sum(W ** 2)

    def __post_init__(self) -> None:
        if self.pooling not in ("avg", "flatten"):
            raise ConfigError(f"head pooling must be 'avg' or 'flatten', got {self.pooling!r}")
        if not all(isinstance(width, int) and width >= 1 for width in self.hidden):
            raise ConfigError(f"head hidden sizes must be positive integers, got {list(self.hidden)}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"head dropout must be in [0, 1), got {self.dropout}")
        if self.l2 < 0:
            raise ConfigError(f"head l2 must be >= 0, got {self.l2}")


# Study E: GlobalAvgPool -> Dense 1024 ReLU (L2 0.01) -> BatchNorm -> Dropout 0.5 -> Dense classes.
STUDY_E_HEAD = HeadSpec(pooling="avg", hidden=(1024,), dropout=0.5, batch_norm=True, norm_before_dropout=True, l2=0.01)
NAMED_HEADS = {"study_e": STUDY_E_HEAD}


def resolve_head(
    head: str,
    default: HeadSpec,
    *,
    pooling: str | None = None,
    dropout: float | None = None,
    hidden: list[int] | tuple[int, ...] | None = None,
) -> HeadSpec:
    """``head="default"`` is the model's own head, else a named one; explicit options override it."""
    if head == "default":
        spec = default
    elif head in NAMED_HEADS:
        spec = NAMED_HEADS[head]
    else:
        raise ConfigError(f"unknown head {head!r}; choose 'default' or one of {sorted(NAMED_HEADS)}")
    if pooling is not None:
        spec = replace(spec, pooling=cast(Pooling, pooling))  # HeadSpec validates the value
    if dropout is not None:
        spec = replace(spec, dropout=dropout)
    if hidden is not None:
        spec = replace(spec, hidden=tuple(hidden))
    return spec


class L2Linear(nn.Linear):
    """``nn.Linear`` carrying a Keras ``kernel_regularizer=l2(factor)`` for the trainer to add to the loss."""

    def __init__(self, in_features: int, out_features: int, l2: float) -> None:
        super().__init__(in_features, out_features)
        self.l2 = l2

    def l2_penalty(self) -> torch.Tensor:
        return self.l2 * self.weight.pow(2).sum()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, l2={self.l2}"


class SizedFlatten(nn.Flatten):
    """Keras ``Flatten`` for the feature-map shape the dense layer after it was sized for.

    Another input size would reach the dense layer as a bare "mat1 and mat2 shapes cannot be
    multiplied"; this names the cause instead."""

    def __init__(self, feature_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.feature_shape = tuple(feature_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.feature_shape:
            raise UsageError(
                f"this Flatten head was sized for a {self.feature_shape} feature map, i.e. the input size the "
                f"model was built for, but got {tuple(x.shape[1:])}: give images of that size (data.image_size) "
                "or rebuild the model for the new size"
            )
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"feature_shape={self.feature_shape}"


def build_head(spec: HeadSpec, feature_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    """Modules mapping a ``(N, *feature_shape)`` feature map (2D or 3D) to ``num_classes`` logits."""
    channels, spatial = feature_shape[0], feature_shape[1:]
    layers: list[nn.Module] = []
    if spec.pooling == "avg":
        pool = nn.AdaptiveAvgPool2d(1) if len(spatial) == 2 else nn.AdaptiveAvgPool3d(1)
        layers += [pool, nn.Flatten()]
        width = channels
    else:
        layers.append(SizedFlatten(feature_shape))
        width = channels * math.prod(spatial)
    for hidden in spec.hidden:
        layers += [L2Linear(width, hidden, spec.l2) if spec.l2 else nn.Linear(width, hidden), nn.ReLU(inplace=True)]
        dropout = [nn.Dropout(spec.dropout)] if spec.dropout else []
        norm = [nn.BatchNorm1d(hidden)] if spec.batch_norm else []
        layers += [*norm, *dropout] if spec.norm_before_dropout else [*dropout, *norm]
        width = hidden
    if not spec.hidden and spec.dropout:
        layers.append(nn.Dropout(spec.dropout))
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
