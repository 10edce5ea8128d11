"""timm-style model registry: ``create_model(name, num_classes, ...)`` and ``list_models()``."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from covidscan.config import ConfigError, RunConfig
from covidscan.errors import UsageError


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    spatial_dims: int
    description: str
    default_input_size: int
    takes_input_size: bool = False  # the builder accepts ``input_size`` (e.g. to size a Flatten head)


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    name: str, *, spatial_dims: int = 2, description: str = "", input_size: int = 224, takes_input_size: bool = False
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding a builder ``fn(num_classes, in_channels, pretrained, weights, **kw)``.

    ``takes_input_size``: the builder also accepts ``input_size`` (the square input side), which
    :func:`create_model` then passes on when it is known (from a config: ``data.image_size``)."""

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = ModelEntry(
            name, builder, spatial_dims, description or (builder.__doc__ or "").strip(), input_size, takes_input_size
        )
        return builder

    return decorator


def unregister_model(name: str) -> None:
    """Remove a model added with :func:`register_model` (plugins and tests that add models for a while)."""
    if name not in _REGISTRY:
        raise ValueError(f"model {name!r} is not registered")
    del _REGISTRY[name]


def _ensure_builtins() -> None:
    from covidscan.models import zoo, zoo3d  # noqa: F401  (importing registers the built-in models)


def list_models(pattern: str = "*", spatial_dims: int | None = None) -> list[str]:
    _ensure_builtins()
    return sorted(
        name
        for name, entry in _REGISTRY.items()
        if fnmatch.fnmatch(name, pattern) and spatial_dims in (None, entry.spatial_dims)
    )


def model_entry(name: str) -> ModelEntry:
    _ensure_builtins()
    if name not in _REGISTRY:
        close = fnmatch.filter(_REGISTRY, f"*{name[:4]}*")
        hint = f" Did you mean {close}?" if close else ""
        raise ConfigError(f"unknown model {name!r}.{hint} Available: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def create_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    pretrained: bool = False,
    weights: str | None = None,
    input_size: int | None = None,
    **kwargs,
) -> nn.Module:
    """Build a registered model. ``weights`` is a local file used instead of a download;
    ``input_size`` is the square input side, for models that size layers from it (Flatten heads)."""
    if num_classes < 2:
        raise UsageError(f"num_classes must be >= 2, got {num_classes}")
    if in_channels < 1:
        raise UsageError(f"in_channels must be >= 1, got {in_channels}")
    entry = model_entry(name)
    if input_size is not None and entry.takes_input_size:
        kwargs["input_size"] = input_size
    return entry.builder(
        num_classes=num_classes, in_channels=in_channels, pretrained=pretrained, weights=weights, **kwargs
    )


def create_model_from_config(config: RunConfig, num_classes: int, *, load_weights: bool = True) -> nn.Module:
    """The model a run config describes: ``model.*`` plus what the data fixes (input channels, and
    the input size a Flatten head is sized for, ``data.image_size``). ``load_weights=False`` skips
    pretrained / local weights, for rebuilding a trained model whose weights come from its checkpoint."""
    model = config.model
    kwargs = {key: value for key, value in model.kwargs.items() if key != "input_size"}  # derived (RunConfig checks)
    return create_model(
        model.name,
        num_classes=num_classes,
        in_channels=config.data.channels,
        pretrained=model.pretrained and load_weights,
        weights=model.weights if load_weights else None,
        input_size=config.data.image_size,
        **kwargs,
    )
