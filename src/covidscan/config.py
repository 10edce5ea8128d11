"""Typed run configuration: one YAML file plus a seed fully describes a run.

Every section is a dataclass whose ``__post_init__`` rejects invalid values early (Lightning-style),
so a typo in a config fails before any data is read, naming the key and the fix.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from covidscan.errors import UserError


class ConfigError(UserError, ValueError):
    """A config value or key is invalid; the message names the key and what is allowed."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class WindowConfig:
    """CT intensity window in Hounsfield units (lung window by default)."""

    level: float = -600.0
    width: float = 1500.0

    def __post_init__(self) -> None:
        _check(self.width > 0, f"data.window.width must be > 0, got {self.width}")


# Named sets of the robustness options below; a preset fills every such option left unset (null).
AUGMENT_PRESETS: dict[str, dict[str, float]] = {
    # what differs between hospitals' images: exposure and contrast curves, scanner resolution and
    # reconstruction sharpness, noise, JPEG export quality, framing (see docs/training.md)
    "robust": {
        "gamma": 0.3,
        "contrast": 0.3,
        "blur": 1.0,
        "noise": 0.03,
        "low_resolution": 0.5,
        "jpeg_quality": 30,
        "crop": 0.2,
    },
}
_ROBUST_OPTIONS = ("gamma", "contrast", "blur", "noise", "low_resolution", "jpeg_quality", "crop")


@dataclass
class AugmentConfig:
    """Training-time augmentation, in the studies' Keras-style vocabulary; off at evaluation.

    The robustness options (``gamma`` ... ``crop``) default to null: off, or the ``preset``'s value
    when a preset is named; an explicit value, 0 included, overrides the preset. ``resolved()``
    gives the values in force. Each of gamma/contrast/blur/noise/low_resolution/jpeg_quality fires
    on an image with probability ``prob``; the geometric options, brightness and crop always do.
    """

    rotation: float = 0.0  # degrees, uniform in [-rotation, rotation]
    zoom: float = 0.0  # relative, scale in [1 - zoom, 1 + zoom]
    shift: float = 0.0  # fraction of width/height
    hflip: bool = False
    brightness: float = 0.0  # relative factor jitter
    interpolation: Literal["nearest", "bilinear"] = "nearest"  # rotation/zoom/shift resampling
    fill: Literal["constant", "nearest", "reflect"] = "constant"  # outside the image: black, edge, mirror (Keras)
    preset: str = "none"  # "none" or a name in AUGMENT_PRESETS (fills the unset options below)
    gamma: float | None = None  # gamma in [1 - gamma, 1 + gamma]
    contrast: float | None = None  # contrast factor in [1 - contrast, 1 + contrast] about the image mean
    blur: float | None = None  # Gaussian blur, sigma up to this many pixels (of the resized image)
    noise: float | None = None  # Gaussian noise, standard deviation up to this (intensities in [0, 1])
    low_resolution: float | None = None  # down- then up-sampling, by a factor in [1 - low_resolution, 1]
    jpeg_quality: int | None = None  # JPEG re-encoding at a quality in [jpeg_quality, 95]; 0 = off
    crop: float | None = None  # random resized crop: side in [1 - crop, 1] of the image, resized back
    prob: float = 0.3  # chance that each of gamma/contrast/blur/noise/low_resolution/jpeg_quality fires

    def __post_init__(self) -> None:
        _check(0 <= self.rotation <= 180, f"data.augment.rotation must be in [0, 180], got {self.rotation}")
        for name in ("zoom", "shift", "brightness", "gamma", "contrast", "low_resolution", "crop"):
            value = getattr(self, name)
            _check(value is None or 0 <= value < 1, f"data.augment.{name} must be in [0, 1), got {value}")
        _check(
            self.blur is None or 0 <= self.blur <= 10, f"data.augment.blur must be in [0, 10] pixels, got {self.blur}"
        )
        _check(
            self.noise is None or 0 <= self.noise <= 0.5, f"data.augment.noise must be in [0, 0.5], got {self.noise}"
        )
        _check(
            self.jpeg_quality is None or self.jpeg_quality == 0 or 1 <= self.jpeg_quality <= 95,
            f"data.augment.jpeg_quality must be 0 (off) or in [1, 95], got {self.jpeg_quality}",
        )
        _check(0 <= self.prob <= 1, f"data.augment.prob must be in [0, 1], got {self.prob}")
        _check(
            self.preset == "none" or self.preset in AUGMENT_PRESETS,
            f"data.augment.preset must be 'none' or one of {sorted(AUGMENT_PRESETS)}, got {self.preset!r}",
        )

    def resolved(self) -> AugmentConfig:
        """The options in force: unset robustness options take the preset's value, else 0 (off)."""
        preset = AUGMENT_PRESETS.get(self.preset, {})
        values: dict[str, Any] = {name: preset.get(name, 0) for name in _ROBUST_OPTIONS if getattr(self, name) is None}
        return dataclasses.replace(self, **values)


SplitMethod = Literal["auto", "stratified", "grouped", "kfold", "predefined", "file"]


@dataclass
class SplitConfig:
    """How samples are divided into train/val/test.

    ``auto`` picks ``predefined`` when the manifest has a split column, ``grouped`` when patient ids
    are known (no patient in two splits) and ``stratified`` otherwise.
    """

    method: SplitMethod = "auto"
    ratios: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    folds: int = 5
    fold: int = 0
    file: str | None = None  # a splits.csv saved by an earlier run, for method "file"
    stratify_by_source: bool = False  # multi-source data: keep every source's class mix in every split

    def __post_init__(self) -> None:
        _check(len(self.ratios) == 3, f"data.split.ratios needs 3 numbers (train, val, test), got {self.ratios}")
        _check(all(r >= 0 for r in self.ratios), f"data.split.ratios must be >= 0, got {self.ratios}")
        _check(abs(sum(self.ratios) - 1) < 1e-6, f"data.split.ratios must sum to 1, got {self.ratios}")
        _check(self.ratios[0] > 0, "data.split.ratios: the train share must be > 0")
        _check(self.folds >= 2, f"data.split.folds must be >= 2, got {self.folds}")
        _check(0 <= self.fold < self.folds, f"data.split.fold must be in [0, {self.folds}), got {self.fold}")
        _check(self.method != "file" or bool(self.file), "data.split.method 'file' needs data.split.file")


@dataclass
class VolumeConfig:
    """3D input (``data.spatial_dims: 3``): how a CT scan becomes stacks of ``data.depth`` slices.

    See docs/volumes.md. Stacks start every ``stride`` slices (default ``depth``: non-overlapping),
    plus one stack ending on the last slice so no slice is left out.
    """

    z_spacing: float | None = None  # resample slices to this many mm apart; None keeps the scan's own
    lung: Literal["none", "crop", "mask"] = "none"  # crop in-plane to the lungs, or blank outside them
    short_scan: Literal["pad", "refuse"] = "pad"  # scan with fewer slices than depth: edge-pad or error
    stride: int | None = None  # slices between stack starts; None = depth
    cache_scans: int = 4  # preprocessed scans kept in RAM per dataset (LRU), per DataLoader worker
    cache_dir: str | None = None  # also keep preprocessed scans here as .npy (memory-mapped): fast shuffled epochs

    def __post_init__(self) -> None:
        _check(self.z_spacing is None or self.z_spacing > 0, f"data.volume.z_spacing must be > 0, got {self.z_spacing}")
        _check(self.stride is None or self.stride >= 1, f"data.volume.stride must be >= 1, got {self.stride}")
        _check(self.cache_scans >= 1, f"data.volume.cache_scans must be >= 1, got {self.cache_scans}")


@dataclass
class ReadLimits:
    """What any reader accepts, checked on the header before a pixel is decoded (``data.limits``).

    The same limits hold in training, evaluation, prediction, explanation and the HTTP API, so a
    decompression bomb or a runaway series is a clear error naming the file everywhere.
    """

    max_file_bytes: int = 2**30  # one file on disk (an image, a DICOM slice, a NIfTI volume)
    max_side: int = 16384  # pixels along either side of an image or slice
    max_pixels: int = 2**26  # pixels of one image or slice (67 M: an 8192 x 8192 image)
    max_slices: int = 4096  # slices (files) of one DICOM series or NIfTI volume
    max_decoded_bytes: int = 2**32  # decompressed float32 size of one read (4 GiB)

    def __post_init__(self) -> None:
        for name in ("max_file_bytes", "max_side", "max_pixels", "max_slices", "max_decoded_bytes"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, f"data.limits.{name} must be an integer >= 1, got {value!r}")


@dataclass
class SourceConfig:
    """One dataset among several (``data.source`` as a list): its own name and label map.

    ``name`` tags every sample (``Sample.source``) so splits, metrics and cross-source validation
    can tell the sources apart; it defaults to the folder name (the CSV's folder for a manifest).
    ``label_map`` renames this source's raw labels before ``data.label_map`` applies to all.
    """

    path: str
    name: str = ""  # empty: derived from the path
    label_map: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(bool(str(self.path).strip()), "data.source: a source needs a path (folder, manifest or 'sample')")
        if not self.name:
            self.name = default_source_name(self.path)


def default_source_name(path: str | Path) -> str:
    """A source's default name: ``covid-ct/metadata.csv`` -> ``covid-ct``, ``datasets/sarscov2-ct`` ->
    ``sarscov2-ct``, ``sample`` -> ``sample``."""
    candidate = Path(str(path))
    if candidate.suffix.lower() == ".csv":
        candidate = candidate.parent
    return candidate.name or str(path)


SourceSpec = str | list[SourceConfig | str]


def _as_sources(spec: SourceSpec | None, key: str) -> list[SourceConfig]:
    """The list form of ``data.source`` / ``data.test_source``; names must be unique."""
    if spec is None:
        return []
    items = [spec] if isinstance(spec, str) else spec
    sources = [item if isinstance(item, SourceConfig) else SourceConfig(path=item) for item in items]
    _check(bool(sources), f"{key} is an empty list; give at least one source")
    names = [s.name for s in sources]
    repeated = sorted({n for n in names if names.count(n) > 1})
    _check(not repeated, f"{key}: several sources are named {repeated}; give each a distinct name")
    return sources


@dataclass
class DataConfig:
    """Where images come from and how they become tensors."""

    # folder-per-class root, CSV manifest, "sample" (generated demo set), or a list of sources
    # ({path, name, label_map} mappings or plain paths) trained on together
    source: SourceSpec = "sample"
    test_source: SourceSpec | None = None  # optional separate labelled test set(s), same forms
    classes: list[str] | None = None  # class order; discovered (sorted) when omitted
    label_map: dict[str, str] = field(default_factory=dict)  # raw folder/label name -> class name
    positive_class: str | None = None  # binary metrics' positive class; default: a class named like COVID
    image_size: int = 224
    channels: int = 3  # 1 = grayscale, 3 = grayscale stacked to RGB for ImageNet backbones
    window: WindowConfig | None = None  # HU window applied to DICOM/NIfTI input
    # imagenet: ImageNet mean/std; inception: to [-1, 1] (TF-trained weights, e.g. EfficientNet-Lite);
    # sample: per image; dataset: training-split mean/std; sample+dataset: both, in Keras' order
    normalize: Literal["imagenet", "inception", "sample", "dataset", "sample+dataset", "none"] = "imagenet"
    intensity: Literal["none", "equalize", "clahe"] = "none"  # per-image histogram equalisation, train and eval
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    max_per_class: int | None = None  # cap for quick runs on a subset (per class in each source)
    skip_bad: bool = False  # skip unreadable files (listed in the run dir) instead of failing
    num_workers: int = 0
    prefetch_factor: int = 2  # batches each DataLoader worker prepares ahead (num_workers > 0 only)
    spatial_dims: Literal[2, 3] = 2
    depth: int = 16  # slices per stack for 3D models
    volume: VolumeConfig = field(default_factory=VolumeConfig)  # 3D stacking, resampling, lung crop
    lung: Literal["none", "crop", "mask"] = "none"  # 2D: crop to the lungs or black outside them (data/lung.py)
    limits: ReadLimits = field(default_factory=ReadLimits)  # what a readable input may declare

    def __post_init__(self) -> None:
        if not isinstance(self.source, str):
            self.source = list[SourceConfig | str](_as_sources(self.source, "data.source"))
        if self.test_source is not None and not isinstance(self.test_source, str):
            self.test_source = list[SourceConfig | str](_as_sources(self.test_source, "data.test_source"))
        _check(16 <= self.image_size <= 2048, f"data.image_size must be in [16, 2048], got {self.image_size}")
        _check(self.channels in (1, 3), f"data.channels must be 1 or 3, got {self.channels}")
        _check(self.max_per_class is None or self.max_per_class > 0, "data.max_per_class must be > 0")
        _check(self.num_workers >= 0, "data.num_workers must be >= 0")
        _check(self.prefetch_factor >= 1, f"data.prefetch_factor must be >= 1, got {self.prefetch_factor}")
        _check(self.depth >= 1, f"data.depth must be >= 1, got {self.depth}")
        _check(
            self.spatial_dims == 3 or self.volume.lung == "none",
            f"data.volume.lung applies to 3D volumes only; for 2D images use data.lung: {self.volume.lung}",
        )
        _check(
            self.spatial_dims == 2 or self.lung == "none",
            f"data.lung applies to 2D images only; for 3D volumes use data.volume.lung: {self.lung}",
        )

    @property
    def sources(self) -> list[SourceConfig]:
        """``data.source`` as a list of named sources (one for the single-string form)."""
        return _as_sources(self.source, "data.source")

    @property
    def test_sources(self) -> list[SourceConfig]:
        return _as_sources(self.test_source, "data.test_source")


@dataclass
class ModelConfig:
    """Which registry model to build (see ``covidscan.models.list_models()``)."""

    name: str = "cnn1"
    pretrained: bool = False
    weights: str | None = None  # local weights file or covidscan run directory, used instead of downloading
    head: Literal["softmax", "sigmoid"] = "softmax"  # softmax + CE, or sigmoid + BCE per class
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra model-specific arguments
    # a phase may freeze a randomly initialised backbone (trainable: head / last:N before any 'all' phase)
    # only when this says so: otherwise the trainer refuses it as a likely mistake
    allow_random_frozen: bool = False


@dataclass
class SchedulerConfig:
    """Learning-rate schedule; ``exponential`` decays per optimisation step as Keras does."""

    name: Literal["constant", "step", "exponential", "cosine"] = "constant"
    step_size: int = 10  # epochs between x gamma for "step"
    gamma: float = 0.1
    decay_steps: int = 100_000  # for "exponential": lr * rate ** (step / decay_steps)
    decay_rate: float = 0.96
    min_lr: float = 0.0  # for "cosine": the rate reached after the phase's last epoch

    def __post_init__(self) -> None:
        _check(self.step_size >= 1, "scheduler.step_size must be >= 1")
        _check(0 < self.gamma <= 1, "scheduler.gamma must be in (0, 1]")
        _check(self.decay_steps >= 1, "scheduler.decay_steps must be >= 1")
        _check(0 < self.decay_rate <= 1, "scheduler.decay_rate must be in (0, 1]")
        _check(self.min_lr >= 0, "scheduler.min_lr must be >= 0")


@dataclass
class PhaseConfig:
    """One training phase; several phases run in order (study E: head only, then fine-tune)."""

    epochs: int = 1
    optimizer: Literal["adam", "adamw", "rmsprop", "sgd"] = "adam"
    lr: float = 1e-4
    weight_decay: float = 0.0
    momentum: float = 0.9
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trainable: str = "all"  # "all", "head" (frozen backbone) or "last:N" (last N layers + head)

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, f"phase epochs must be >= 1, got {self.epochs}")
        _check(self.lr > 0, f"phase lr must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, "phase weight_decay must be >= 0")
        valid = self.trainable in ("all", "head") or (
            self.trainable.startswith("last:") and self.trainable[5:].isdigit()
        )
        _check(valid, f"phase trainable must be 'all', 'head' or 'last:N', got {self.trainable!r}")


@dataclass
class EarlyStoppingConfig:
    monitor: str = "val_loss"
    patience: int = 10
    mode: Literal["min", "max"] = "min"
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        _check(self.patience >= 1, "training.early_stopping.patience must be >= 1")


@dataclass
class DomainAdaptationConfig:
    """Domain-adversarial training (DANN) towards unlabelled images of the site a model will serve.

    ``target``: folders of unlabelled images (searched recursively), single images, or CSV manifests
    (their labels, if any, are ignored). Keep the patients you will evaluate on out of it.
    """

    target: str | list[str]
    weight: float = 1.0  # the largest gradient-reversal coefficient (ramped up from 0 over the run)
    hidden: int = 256  # width of the domain classifier's hidden layer
    lr: float = 1e-3  # Adam learning rate of the domain classifier

    def __post_init__(self) -> None:
        targets = [self.target] if isinstance(self.target, str) else self.target
        _check(
            bool(targets) and all(str(t).strip() for t in targets),
            "training.domain_adaptation.target needs at least one folder, image or manifest of unlabelled images",
        )
        _check(self.weight > 0, f"training.domain_adaptation.weight must be > 0, got {self.weight}")
        _check(self.hidden >= 1, f"training.domain_adaptation.hidden must be >= 1, got {self.hidden}")
        _check(self.lr > 0, f"training.domain_adaptation.lr must be > 0, got {self.lr}")

    @property
    def targets(self) -> list[str]:
        return [self.target] if isinstance(self.target, str) else list(self.target)


@dataclass
class TrainingConfig:
    batch_size: int = 32
    phases: list[PhaseConfig] = field(default_factory=lambda: [PhaseConfig()])
    class_weights: Literal["none", "balanced"] = "none"
    early_stopping: EarlyStoppingConfig | None = None
    checkpoint_monitor: str = "val_loss"
    checkpoint_mode: Literal["min", "max"] = "min"
    grad_clip: float | None = None
    amp: bool = True  # mixed precision, used on CUDA only
    amp_dtype: Literal["bfloat16", "float16"] = "bfloat16"  # float16 adds loss scaling (GradScaler)
    channels_last: bool = False  # channels-last memory format on CUDA (faster convolutions with AMP)
    compile: bool = False
    device: str = "auto"
    deterministic: bool = True
    strict_leakage: bool = False  # refuse to train when test shares near-duplicates with train
    domain_adaptation: DomainAdaptationConfig | None = None  # DANN towards unlabelled target-site images

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, f"training.batch_size must be >= 1, got {self.batch_size}")
        _check(len(self.phases) >= 1, "training.phases needs at least one phase")
        _check(self.grad_clip is None or self.grad_clip > 0, "training.grad_clip must be > 0")


@dataclass
class RunConfig:
    """The whole run: ``covidscan train --config FILE`` builds one of these."""

    name: str = "run"
    seed: int = 42
    output_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def __post_init__(self) -> None:
        size = self.model.kwargs.get("input_size")
        _check(
            size is None or size == self.data.image_size,
            f"model.kwargs.input_size ({size}) differs from data.image_size ({self.data.image_size}); remove "
            "model.kwargs.input_size: a Flatten head is sized from data.image_size",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def build_from_plain(cls: Any, value: Any, key: str = "") -> Any:
    """Build any config-style dataclass (or annotated type) from plain YAML data, with the same
    checks and key-naming errors as a run config; other file formats (study files) use it too."""
    return _build(cls, value, key)


def _build(cls: Any, value: Any, key: str) -> Any:
    """Turn plain YAML data into the annotated type, naming ``key`` on any mismatch."""
    origin = typing.get_origin(cls)
    if origin in (typing.Union, types.UnionType):
        return _build_union(typing.get_args(cls), value, key)
    if origin is Literal:
        allowed = typing.get_args(cls)
        _check(value in allowed, f"{key} must be one of {list(allowed)}, got {value!r}")
        return value
    if origin is list:
        _check(isinstance(value, (list, tuple)), f"{key} must be a list, got {value!r}")
        (item_type,) = typing.get_args(cls)
        return [_build(item_type, item, f"{key}.{i}") for i, item in enumerate(value)]
    if origin is dict:
        _check(isinstance(value, dict), f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(cls):
        return _build_dataclass(cls, value, key)
    return _build_scalar(cls, value, key)


def _build_union(options: tuple[Any, ...], value: Any, key: str) -> Any:
    """The first option that accepts ``value``; the first option's complaint when none does."""
    if value is None and type(None) in options:
        return None
    fitting: list[str] = []
    others: list[str] = []
    for option in options:
        if option is type(None):
            continue
        try:
            return _build(option, value, key)
        except ConfigError as exc:
            (fitting if _same_shape(option, value) else others).append(str(exc))
    errors = fitting + others  # the complaint of the option shaped like the value says what is wrong inside it
    raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")


def _same_shape(option: Any, value: Any) -> bool:
    """Whether ``value`` is a list / mapping / scalar as ``option`` expects."""
    origin = typing.get_origin(option)
    if isinstance(value, list):
        return origin is list
    if isinstance(value, dict):
        return origin is dict or dataclasses.is_dataclass(option)
    return origin not in (list, dict) and not dataclasses.is_dataclass(option)


def _build_dataclass(cls: Any, value: Any, key: str) -> Any:
    _check(isinstance(value, dict), f"{key or 'config'} must be a mapping, got {value!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - names)
    _check(
        not unknown,
        f"unknown config key(s) {[f'{key}.{u}'.lstrip('.') for u in unknown]}; "
        f"allowed under {key or 'the top level'}: {sorted(names)}",
    )
    kwargs = {name: _build(hints[name], item, f"{key}.{name}".lstrip(".")) for name, item in value.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as exc:
        raise ConfigError(f"{key}: {exc}") from exc


def _build_scalar(cls: Any, value: Any, key: str) -> Any:
    if cls is float:
        if isinstance(value, str):  # PyYAML reads "1e-4" (no dot) as text; accept it as the number it is
            with contextlib.suppress(ValueError):
                value = float(value)
        _check(
            isinstance(value, (int, float)) and not isinstance(value, bool), f"{key} must be a number, got {value!r}"
        )
        return float(value)
    if cls is int:
        _check(isinstance(value, int) and not isinstance(value, bool), f"{key} must be an integer, got {value!r}")
        return value
    if cls is bool:
        _check(isinstance(value, bool), f"{key} must be true or false, got {value!r}")
        return value
    if cls is str:
        _check(
            isinstance(value, (str, int, float)) and not isinstance(value, bool), f"{key} must be text, got {value!r}"
        )
        return str(value)
    return value


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node: Any = tree
    for part in parts[:-1]:
        if isinstance(node, list):
            _check(part.isdigit() and int(part) < len(node), f"--set {dotted}: no list index {part}")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
            if node is None:
                raise ConfigError(f"--set {dotted}: '{part}' is null in the config; set the whole section instead")
    last = parts[-1]
    if isinstance(node, list):
        _check(last.isdigit() and int(last) < len(node), f"--set {dotted}: no list index {last}")
        node[int(last)] = value
    else:
        node[last] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse ``key.sub=value`` strings; values are read as YAML (numbers, bools, lists)."""
    parsed = []
    for item in overrides:
        _check("=" in item, f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        parsed.append((key.strip(), yaml.safe_load(raw) if raw != "" else None))
    return parsed


def _defaults_tree(raw: dict[str, Any]) -> dict[str, Any]:
    """Full default config with ``raw`` laid over it, so --set can reach keys the file omits."""
    defaults = RunConfig().to_dict()

    def merge(base: Any, over: Any) -> Any:
        if isinstance(base, dict) and isinstance(over, dict):
            merged = dict(base)
            for k, v in over.items():
                merged[k] = merge(base.get(k), v) if k in base else v
            return merged
        return copy.deepcopy(over)

    return merge(defaults, raw)


def config_from_dict(raw: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    tree = _defaults_tree(raw or {})
    for key, value in parse_overrides(overrides or []):
        _set_path(tree, key, value)
    return _build(RunConfig, tree, "")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
        _check(isinstance(raw, dict), f"{path} must contain a mapping at the top level")
        raw = _resolve_paths(raw, path.parent)
    return config_from_dict(raw, overrides)


def _resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Relative data paths in a config file are relative to the *project root* (cwd) when they exist
    there, otherwise to the config file's folder; ``sample`` is kept as the embedded-demo keyword."""
    data = raw.get("data")
    if not isinstance(data, dict):
        return raw
    for key in ("source", "test_source"):
        value = data.get(key)
        if value is None:
            continue
        if isinstance(value, list):
            data[key] = [
                {**item, "path": _resolved(item["path"], base)}
                if isinstance(item, dict) and isinstance(item.get("path"), str)
                else _resolved(item, base)
                for item in value
            ]
        else:
            data[key] = _resolved(value, base)
    return raw


def _resolved(value: Any, base: Path) -> Any:
    if (
        isinstance(value, str)
        and value != "sample"
        and not Path(value).is_absolute()
        and not Path(value).exists()
        and (base / value).exists()
    ):
        return str(base / value)
    return value
