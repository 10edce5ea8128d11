"""Grad-CAM, Grad-CAM++ and Smooth Grad-CAM++: one implementation for 2D and 3D models.

The three methods differ only in how the channels of the target layer's feature map ``A`` are
weighted from the gradients ``dY/dA`` of the explained class score ``Y``:

- Grad-CAM (Selvaraju et al. 2017): the spatial mean of the gradients;
- Grad-CAM++ (Chattopadhyay et al. 2018): gradients weighted per position by
  ``alpha = g^2 / (2 g^2 + sum(A) g^3)`` (the closed form for an exponential score);
- Smooth Grad-CAM++ (Omeiza et al. 2019): Grad-CAM++ with the first, second and third
  derivatives averaged over ``samples`` copies of the input with Gaussian noise.

Why not MONAI's or a CAM library's classes (checked: monai 1.6.1, grad-cam 1.5.7, torchcam 0.5.0):
MONAI's ``ModelWithHooks`` never removes its hooks and calls ``backward`` (writing every parameter's
``.grad``); pytorch-grad-cam retains the graph, zeroes the parameters' ``.grad`` and adds an
``eps = 1e-6`` to Grad-CAM++'s denominator that dominates the tiny gradients of a global-pooled
backbone; torchcam's Grad-CAM++ divides a masked *copy* of alpha in place, so its alpha stays
``g^2``. Neither pytorch-grad-cam nor MONAI has Smooth Grad-CAM++. The arithmetic is a few lines;
here the gradients come from ``torch.autograd.grad`` (parameters' ``.grad`` untouched, no graph
kept) and the one forward hook is removed before returning, even on error.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from covidscan.errors import UsageError

CamMethod = Literal["gradcam", "gradcampp", "smoothgradcampp"]
CAM_METHODS: tuple[str, ...] = get_args(CamMethod)


@dataclass(frozen=True)
class CamResult:
    """Maps for a batch, with the forward pass that produced them."""

    maps: torch.Tensor  # (N, *input_spatial), in [0, 1] unless computed with normalize=False
    logits: torch.Tensor  # (N, K) on the clean input
    target: torch.Tensor  # (N,) explained class index per item
    layer: str  # name of the module whose output was explained


def resolve_target_layer(model: nn.Module, layer: str | None = None) -> tuple[str, nn.Module]:
    """The explained module: ``layer`` by name, else the model's ``cam_target`` (registry models)."""
    if layer is None:
        target = getattr(model, "cam_target", None)
        if target is None:
            raise UsageError(
                f"{type(model).__name__} has no cam_target; pass the layer name (see model.named_modules())"
            )
        name = next((n for n, m in model.named_modules() if m is target), None)
        if name is None:
            raise ValueError("model.cam_target is not a submodule of the model")
        return name, target
    modules = dict(model.named_modules())
    if layer not in modules:
        close = difflib.get_close_matches(layer, [n for n in modules if n], n=5)
        hint = f" Did you mean {close}?" if close else " See model.named_modules() for the names."
        raise UsageError(f"layer {layer!r} is not a module of {type(model).__name__}.{hint}")
    return layer, modules[layer]


def compute_cam(
    model: nn.Module,
    x: torch.Tensor,
    method: CamMethod = "gradcam",
    *,
    target_class: int | None = None,
    layer: str | None = None,
    samples: int = 8,
    sigma: float = 0.1,
    normalize: bool = True,
    seed: int = 0,
) -> CamResult:
    """Class activation maps of ``model`` for the batch ``x`` of shape (N, C, *spatial).

    ``target_class`` is a class index; by default each item's predicted class. For Smooth
    Grad-CAM++, ``sigma`` is the noise std as a fraction of each item's value range (as in
    SmoothGrad), so it means the same whatever the input normalisation. ``normalize=False``
    keeps raw (non-negative) map values, for stitching maps of several inputs before scaling.
    """
    if method not in CAM_METHODS:
        raise UsageError(f"unknown CAM method {method!r}; choose one of {list(CAM_METHODS)}")
    if method == "smoothgradcampp" and samples < 1:
        raise UsageError(f"samples must be >= 1 for Smooth Grad-CAM++, got {samples}")
    if method == "smoothgradcampp" and not sigma > 0:
        raise UsageError(f"sigma must be > 0 for Smooth Grad-CAM++, got {sigma}")
    spatial_dims = getattr(model, "spatial_dims", x.ndim - 2)
    if x.ndim != spatial_dims + 2:
        raise ValueError(
            f"expected a (N, C, {'D, ' if spatial_dims == 3 else ''}H, W) batch for a "
            f"{spatial_dims}D model, got shape {tuple(x.shape)}"
        )
    name, module = resolve_target_layer(model, layer)
    x = x.detach().to(next(model.parameters()).device)

    with _eval_mode(model):
        activations, grad, logits, target = _forward_backward(model, module, x, _target_picker(target_class))
        if method == "gradcam":
            weights = grad.flatten(2).mean(-1)
        elif method == "gradcampp":
            weights = _gradcampp_weights(activations, grad, grad**2, grad**3)
        else:
            d1, d2, d3 = _noisy_gradient_moments(model, module, x, target, samples, sigma, seed)
            weights = _gradcampp_weights(activations, d1, d2, d3)

    cam = F.relu((weights[(...,) + (None,) * (activations.ndim - 2)] * activations).sum(1, keepdim=True))
    mode = "bilinear" if spatial_dims == 2 else "trilinear"
    cam = F.interpolate(cam, size=x.shape[2:], mode=mode, align_corners=False)[:, 0]
    return CamResult(normalize_maps(cam) if normalize else cam, logits, target, name)


def _target_picker(target_class: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The predicted class per item, or ``target_class`` checked against the number of logits."""

    def pick(logits: torch.Tensor) -> torch.Tensor:
        if target_class is None:
            return logits.argmax(1)
        if not 0 <= target_class < logits.shape[1]:
            raise UsageError(f"target_class must be in [0, {logits.shape[1]}), got {target_class}")
        return torch.full((logits.shape[0],), target_class, dtype=torch.long, device=logits.device)

    return pick


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Scale each map of a (N, *spatial) batch to [0, 1]; an all-flat map becomes zeros."""
    flat = maps.flatten(1)
    low = flat.min(1).values
    span = flat.max(1).values - low
    scaled = (flat - low[:, None]) / span.clamp(min=1e-12)[:, None]
    return torch.where(span[:, None] > 0, scaled, torch.zeros_like(scaled)).view_as(maps)


def _forward_backward(
    model: nn.Module, module: nn.Module, x: torch.Tensor, pick_target: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, ...]:
    """Target-layer activations, d(score)/d(activations), logits and the explained class indices."""
    captured: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _inputs, output: captured.append(output))
    try:
        with torch.enable_grad():
            # a leaf input needing grad keeps the graph alive even when every parameter is frozen
            logits = model(x.detach().requires_grad_(True))
            if len(captured) != 1 or not isinstance(captured[0], torch.Tensor):
                raise UsageError(
                    f"the CAM target layer ran {len(captured)} times or returned no tensor; "
                    "choose a layer used once in forward (see model.named_modules())"
                )
            target = pick_target(logits.detach())
            score = logits.gather(1, target[:, None]).sum()
            (grad,) = torch.autograd.grad(score, captured[0])
    finally:
        handle.remove()
    return captured[0].detach(), grad.detach(), logits.detach(), target


def _gradcampp_weights(activations: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor, d3: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ channel weights from the first three derivatives (Chattopadhyay et al., eq. 19)."""
    activation_sum = activations.flatten(2).sum(-1)[(...,) + (None,) * (activations.ndim - 2)]
    denominator = 2 * d2 + activation_sum * d3
    alpha = torch.where(denominator != 0, d2 / torch.where(denominator != 0, denominator, 1.0), 0.0)
    return (alpha * F.relu(d1)).flatten(2).sum(-1)


def _noisy_gradient_moments(
    model: nn.Module, module: nn.Module, x: torch.Tensor, target: torch.Tensor, samples: int, sigma: float, seed: int
) -> tuple[torch.Tensor, ...]:
    """Mean of g, g^2 and g^3 over ``samples`` noisy copies of ``x`` (Omeiza et al. 2019)."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    value_range = (x.flatten(1).amax(1) - x.flatten(1).amin(1)).clamp(min=1e-6)
    std = (sigma * value_range)[(...,) + (None,) * (x.ndim - 1)]
    moments = [torch.zeros((), device=x.device, dtype=x.dtype) for _ in range(3)]  # broadcast on the first add
    for _ in range(samples):
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) * std
        _, grad, _, _ = _forward_backward(model, module, x + noise, lambda _logits: target)
        moments = [m + grad**power for m, power in zip(moments, (1, 2, 3))]
    return tuple(m / samples for m in moments)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Explain the deterministic model (dropout off, BatchNorm running stats), then restore modes."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
