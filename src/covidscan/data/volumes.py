"""3D CT input (study C): one scan per patient, cut into stacks of ``data.depth`` adjacent slices.

A scan is a DICOM series folder, a NIfTI file, or a folder of slice images (PNG/JPEG, in natural
name order: ``slice2`` before ``slice10``). Each scan becomes one or more ``(C, D, H, W)`` stacks
that inherit its label and patient id; evaluation aggregates stack predictions per patient.

Memory: the stack index is built from headers only (DICOM without pixels, the NIfTI header, a
file count), and pixels are decoded when a stack is asked for. A small LRU cache keeps the last
few preprocessed scans, so streaming the stacks of one scan decodes it once. Nothing holds the
whole dataset in RAM.

Preprocessing of a scan, in order: optional lung crop/mask (HU threshold + largest components,
scipy.ndimage), HU window to [0, 1], in-plane resize to ``image_size`` (antialiased), optional
resampling to ``volume.z_spacing`` mm between slices. Augmentation (``covidscan.data.augment``,
shared with 2D images, following torch's RNG) runs on each stack at training time only. See
docs/volumes.md for the bad-input policies.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from covidscan.config import ConfigError, DataConfig, ReadLimits
from covidscan.data.datasets import SampleDataset
from covidscan.data.io import LUNG_WINDOW, apply_window, read_image, read_volume
from covidscan.data.lung import LUNG_THRESHOLD_HU, lung_box, lung_mask
from covidscan.data.readers import find_reader, list_readers
from covidscan.data.records import DataError, Sample
from covidscan.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_intensity
from covidscan.progress import progress
from covidscan.runtime import atomic_path

logger = logging.getLogger(__name__)

STACK_SEPARATOR = "#stack"


@dataclass(frozen=True)
class ScanHeader:
    """What indexing needs from a scan without decoding pixels."""

    num_slices: int
    z_spacing: float | None  # mm between slices; None when unknown (slice-image folders)
    is_hu: bool  # DICOM/NIfTI are in HU; slice images are already display values in [0, 1]


def slice_image_files(folder: str | Path) -> list[Path]:
    """The slice images of a folder (files a 2D reader takes) in natural name order (``2.png`` before ``10.png``)."""
    files = [p for p in Path(folder).iterdir() if p.is_file() and find_reader(p, volumetric=False) is not None]
    return sorted(files, key=lambda p: [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", p.name)])


def is_scan(path: str | Path) -> bool:
    """A scan for 3D models: what a scan reader takes (DICOM series folder, NIfTI), or a folder of slice images."""
    path = Path(path)
    return find_reader(path, volumetric=True) is not None or (path.is_dir() and bool(slice_image_files(path)))


def read_scan_header(path: str | Path, limits: ReadLimits | None = None) -> ScanHeader:
    """Slice count and spacing of a scan from headers only, within ``limits``; validates DICOM series
    on the way (one series, modality CT, one orientation, known and distinct slice positions)."""
    path = Path(path)
    reader = find_reader(path, volumetric=True)
    if reader is not None:
        header = reader.header(path, limits)
        return ScanHeader(header.shape[0], header.spacing[0] if header.spacing else None, header.is_hu)
    if path.is_dir():
        files = slice_image_files(path)
        if not files:
            raise DataError(
                f"{path}: neither DICOM files nor slice images (readers: {list_readers()}) in this scan folder"
            )
        return ScanHeader(len(files), None, False)
    raise DataError(
        f"{path}: a 3D scan must be a DICOM series folder, a .nii/.nii.gz file or a folder of slice "
        "images; for single 2D images use data.spatial_dims: 2"
    )


def resampled_slice_count(header: ScanHeader, z_spacing: float | None, path: str) -> int:
    """Slices after resampling to ``z_spacing`` mm (the scan's own count when None)."""
    if z_spacing is None:
        return header.num_slices
    if header.z_spacing is None:
        raise DataError(
            f"{path}: slice spacing unknown (slice images carry none), so data.volume.z_spacing cannot "
            "be applied; unset it or give DICOM/NIfTI scans"
        )
    return max(1, round(header.num_slices * header.z_spacing / z_spacing))


def stack_starts(num_slices: int, depth: int, stride: int) -> list[int]:
    """First slice of each stack: every ``stride`` slices, plus one ending on the last slice."""
    if num_slices <= depth:
        return [0]
    starts = list(range(0, num_slices - depth + 1, stride))
    if starts[-1] != num_slices - depth:
        starts.append(num_slices - depth)
    return starts


SLICES_PER_CHUNK = 16  # slices windowed and resized at once: memory is the decoded scan plus this many


def load_scan(path: str | Path, config: DataConfig, header: ScanHeader) -> torch.Tensor:
    """Decode and preprocess one scan to a float32 (D', S, S) tensor in [0, 1].

    The decoded scan is the only full-resolution array held: windowing, lung masking / cropping and
    the in-plane resize run :data:`SLICES_PER_CHUNK` slices at a time into the (small) output, so a
    300-slice 512x512 series peaks at its decoded volume, not at three or four copies of it.
    """
    path = Path(path)
    if header.is_hu:
        volume = read_volume(path, limits=config.limits).hu
    else:
        volume = np.stack([read_image(f, limits=config.limits) for f in slice_image_files(path)])
    lung = config.volume.lung
    mask = None
    if lung != "none":
        if not header.is_hu:
            raise DataError(
                f"{path}: data.volume.lung '{lung}' needs CT values in HU (DICOM/NIfTI); slice images "
                "are already windowed. Set data.volume.lung: none"
            )
        mask = lung_mask(volume)
        if not mask.any():
            raise DataError(
                f"{path}: no lung region found (air below {LUNG_THRESHOLD_HU:g} HU inside the body); "
                "is this a chest CT? Set data.volume.lung: none to use the full slices"
            )
    rows, cols = lung_box(mask) if mask is not None and lung == "crop" else (slice(None), slice(None))
    size = config.image_size
    tensor = torch.empty((volume.shape[0], size, size), dtype=torch.float32)
    for first in range(0, volume.shape[0], SLICES_PER_CHUNK):
        chunk = slice(first, first + SLICES_PER_CHUNK)
        part = apply_window(volume[chunk], config.window or LUNG_WINDOW) if header.is_hu else volume[chunk]
        if mask is not None and lung == "mask":
            part = np.where(mask[chunk], part, 0.0)  # lung-segmented slices: black outside the lungs
        slices = torch.from_numpy(np.ascontiguousarray(part[:, rows, cols], dtype=np.float32))
        if slices.shape[1:] != (size, size):
            slices = F.interpolate(
                slices[:, None], size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )[:, 0]
        tensor[chunk] = slices
    del volume, mask
    depth = resampled_slice_count(header, config.volume.z_spacing, str(path))
    if depth != tensor.shape[0]:
        tensor = F.interpolate(tensor[None, None], size=(depth, size, size), mode="trilinear", align_corners=False)[
            0, 0
        ]
    return tensor.clamp_(0.0, 1.0)


def volume_transform(config: DataConfig, *, train: bool):
    """Transforms for one ``(1, D, H, W)`` stack: augmentation when training (``data.augment``, the
    stack shared with 2D images: in-plane, the same for every slice), ``data.intensity``, channels,
    normalisation (MONAI). Every step is a class instance, so the transform pickles for spawned
    DataLoader workers."""
    from monai.transforms import Compose, NormalizeIntensity, RepeatChannel, ToTensor

    steps: list = []
    if train:
        from covidscan.data.augment import build_augmentation

        steps.append(build_augmentation(config.augment, config.image_size))
    steps.append(build_intensity(config.intensity))
    if config.channels == 3:
        steps.append(RepeatChannel(repeats=3))
    if config.normalize == "imagenet":
        mean, std = (
            (IMAGENET_MEAN, IMAGENET_STD)
            if config.channels == 3
            else ([float(np.mean(IMAGENET_MEAN))], [float(np.mean(IMAGENET_STD))])
        )
        steps.append(NormalizeIntensity(subtrahend=mean, divisor=std, channel_wise=True))
    elif config.normalize == "inception":
        steps.append(
            NormalizeIntensity(subtrahend=[0.5] * config.channels, divisor=[0.5] * config.channels, channel_wise=True)
        )
    elif config.normalize == "sample":
        steps.append(NormalizeIntensity())
    elif config.normalize in ("dataset", "sample+dataset"):
        raise ConfigError(
            f"data.normalize '{config.normalize}' is not available for 3D volumes; use 'sample', 'imagenet', "
            "'inception' or 'none'"
        )
    steps.append(ToTensor(track_meta=False))
    return Compose([step for step in steps if step is not None])


class VolumeStackDataset(SampleDataset):
    """Stacks of ``depth`` adjacent slices over a list of scans; items are ``(C, D, H, W), label``.

    ``item_samples[i]`` is the scan's sample with ``#stack<k>`` appended to its path and the scan's
    patient id (the scan path when it has none), so per-patient aggregation groups a scan's stacks.
    """

    def __init__(self, scans: Sequence[Sample], class_names: Sequence[str], config: DataConfig, *, train: bool) -> None:
        self.scans = list(scans)
        self.config = config
        self.class_index = {name: i for i, name in enumerate(class_names)}
        self.train = train
        self.transform = volume_transform(config, train=train)
        depth, stride = config.depth, config.volume.stride or config.depth
        self.headers: list[ScanHeader] = []
        self.stacks: list[tuple[int, int]] = []  # (scan index, first slice)
        self._item_samples: list[Sample] = []
        short = []
        for scan_index, scan in enumerate(
            progress(self.scans, desc="indexing scans", unit="scan", disable=len(self.scans) < 50)
        ):
            header = read_scan_header(scan.path, config.limits)
            slices = resampled_slice_count(header, config.volume.z_spacing, scan.path)
            if slices == 1 and depth > 1:
                raise DataError(
                    f"{scan.path}: a single-slice scan cannot make a {depth}-slice stack; use "
                    "data.spatial_dims: 2 for single images, or data.depth: 1"
                )
            if slices < depth:
                if config.volume.short_scan == "refuse":
                    raise DataError(
                        f"{scan.path}: {slices} slices, fewer than data.depth {depth}; lower data.depth, "
                        "or set data.volume.short_scan: pad to repeat the edge slices"
                    )
                short.append(scan.path)
            self.headers.append(header)
            for k, start in enumerate(stack_starts(slices, depth, stride)):
                self.stacks.append((scan_index, start))
                self._item_samples.append(
                    replace(scan, path=f"{scan.path}{STACK_SEPARATOR}{k}", patient_id=scan.patient_id or scan.path)
                )
        if short:
            logger.warning(
                "%d scan(s) have fewer than %d slices and are edge-padded (first: %s)", len(short), depth, short[0]
            )
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self.stacks)

    @property
    def item_samples(self) -> list[Sample]:
        return self._item_samples

    def scan_volume(self, scan_index: int) -> torch.Tensor:
        """The preprocessed (D, S, S) scan, from the LRU cache when it was used recently."""
        if scan_index in self._cache:
            self._cache.move_to_end(scan_index)
            return self._cache[scan_index]
        volume = self._load(scan_index)
        self._cache[scan_index] = volume
        if len(self._cache) > self.config.volume.cache_scans:
            self._cache.popitem(last=False)
        return volume

    def _load(self, scan_index: int) -> torch.Tensor:
        """Decode and preprocess, or (``volume.cache_dir``) memory-map the result of an earlier run.

        Training draws stacks in random order, so the RAM cache alone would decode a scan per stack;
        the disk cache turns that into reading one stack's pages. Its key covers every setting that
        changes the preprocessed scan, and the file's modification time.
        """
        path, header = self.scans[scan_index].path, self.headers[scan_index]
        cache_dir = self.config.volume.cache_dir
        if cache_dir is None:
            return load_scan(path, self.config, header)
        config = self.config
        key = repr(
            (
                str(Path(path).resolve()),
                Path(path).stat().st_mtime_ns,
                config.window,
                config.image_size,
                config.volume.z_spacing,
                config.volume.lung,
            )
        )
        file = Path(cache_dir) / f"{hashlib.sha1(key.encode()).hexdigest()}.npy"
        if not file.is_file():
            with atomic_path(file) as tmp:  # a concurrent worker or an interrupted run never sees half a file
                np.save(tmp, load_scan(path, config, header).numpy())
        return torch.from_numpy(np.load(file, mmap_mode="c"))  # copy-on-write: pages read on demand

    def stack(self, index: int) -> torch.Tensor:
        """Item ``index`` as a (1, depth, S, S) [0, 1] stack, edge-padded when the scan is short."""
        scan_index, start = self.stacks[index]
        stack = self.scan_volume(scan_index)[start : start + self.config.depth]
        missing = self.config.depth - stack.shape[0]
        if missing:
            stack = F.pad(stack[None, None], (0, 0, 0, 0, missing // 2, missing - missing // 2), mode="replicate")[0, 0]
        return stack[None]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label = self.scans[self.stacks[index][0]].label
        return self.transform(self.stack(index)), self.class_index[label] if label is not None else -1


def build_volume_dataset(
    config: DataConfig, samples: Sequence[Sample], class_names: Sequence[str], *, train: bool
) -> VolumeStackDataset:
    """The 3D dataset ``build_dataset`` returns for ``data.spatial_dims: 3``."""
    return VolumeStackDataset(samples, class_names, config, train=train)


def scan_stacks(path: str | Path, config: DataConfig) -> torch.Tensor:
    """All evaluation-mode stacks of one scan as a (N, C, D, S, S) batch (prediction, explanation)."""
    dataset = VolumeStackDataset([Sample(str(path), None)], [], config, train=False)
    return torch.stack([dataset[i][0] for i in range(len(dataset))])
