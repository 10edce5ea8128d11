"""Data preparation for a training run: samples and splits, the run's split files and leakage gate,
normalisation statistics, datasets and loaders.

Reading comes before writing: :func:`load_run_splits` and :func:`norm_stats_for` only read, so a
resume can be checked completely before :func:`write_split_files` touches the run directory.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sized
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler, Subset

from covidscan.config import ConfigError, RunConfig, SplitConfig
from covidscan.data import (
    DataError,
    NormStats,
    Sample,
    SampleSet,
    build_dataset,
    fit_norm_stats,
    list_inputs,
    load_samples,
    read_image,
    uses_dataset_stats,
)
from covidscan.data.audit import check_split_leakage
from covidscan.data.shortcuts import warn_cheap_shortcuts
from covidscan.data.sources import read_manifest
from covidscan.data.splits import assign_splits, save_splits
from covidscan.runtime import write_json
from covidscan.training.distributed import DistContext

logger = logging.getLogger(__name__)


@dataclass
class Loaders:
    """The loaders a :class:`~covidscan.training.loop.TrainingLoop` takes, and their datasets' sizes."""

    train: DataLoader
    val: DataLoader | None  # None when the split has no validation part
    train_size: int


def load_run_splits(config: RunConfig, splits_file: Path | None = None) -> SampleSet:
    """Load the samples and split them (``splits_file``: reuse a run's saved split), plus any
    external ``data.test_source`` as extra test rows. Reads only."""
    data = config.data
    samples = load_samples(
        data.source,
        classes=data.classes,
        label_map=data.label_map,
        skip_bad=data.skip_bad,
        max_per_class=data.max_per_class,
        limits=data.limits,
    )
    split_config = SplitConfig(method="file", file=str(splits_file)) if splits_file is not None else data.split
    splits = assign_splits(samples, split_config, config.seed)
    if data.test_source:
        external = load_samples(
            data.test_source,
            classes=splits.class_names,
            label_map=data.label_map,
            skip_bad=data.skip_bad,
            limits=data.limits,
        )
        splits = SampleSet(
            splits.samples + [s.with_split("test") for s in external.samples],
            splits.class_names,
            splits.skipped + external.skipped,
            splits.issues + external.issues,
        )
    return splits


def write_split_files(splits: SampleSet, run_dir: Path, strict_leakage: bool) -> str | None:
    """``splits.csv``, ``label_map.json``, ``skipped.json`` and the leakage report; the refusal
    message when ``strict_leakage`` and val/test leak into train (None otherwise). Also warns once
    when a header-only signal (size, file size, format) predicts the training labels."""
    save_splits(splits, run_dir / "splits.csv")
    write_json(run_dir / "label_map.json", splits.label_map)
    if splits.skipped:
        write_json(run_dir / "skipped.json", [{"path": p, "reason": r} for p, r in splits.skipped])
    try:
        check_split_leakage(splits, strict=strict_leakage, report_path=run_dir / "leakage.json")
    except DataError as exc:
        return str(exc)
    warn_cheap_shortcuts(SampleSet([s for s in splits.samples if s.split == "train"], splits.class_names))
    return None


def norm_stats_for(config: RunConfig, splits: SampleSet, saved: dict | None = None) -> NormStats | None:
    """Dataset-wide mean/std fitted on the training split only (``data.normalize: dataset`` or
    ``sample+dataset``, after ``data.intensity``), or the ``saved`` statistics of a resumed run."""
    data = config.data
    if not uses_dataset_stats(data):
        return None
    if saved:
        return NormStats(**saved)
    if data.spatial_dims == 3:
        raise ConfigError(
            f"data.normalize '{data.normalize}' is fitted on 2D training images; for 3D volumes use 'sample' or 'none'"
        )
    train_paths = [s.path for s in splits.subset("train").samples]
    return fit_norm_stats(
        (read_image(path, data.window, limits=data.limits) for path in train_paths), data.image_size, data.intensity
    )


def build_loaders(
    config: RunConfig, splits: SampleSet, stats: NormStats | None, context: DistContext, device: torch.device
) -> Loaders:
    """Training loader (a ``DistributedSampler`` even for one process: one global shuffling order
    from seed + epoch, so N processes see the same global batches as one) and the validation loader
    (rank r evaluates items r, r+N, ...: no padding, so gathered metrics are exact)."""
    class_names = splits.class_names
    train_set = build_dataset(config.data, splits.subset("train").samples, class_names, train=True, stats=stats)
    val_set = build_dataset(config.data, splits.subset("val").samples, class_names, train=False, stats=stats)
    batch_size = config.training.batch_size // context.world_size
    sampler: DistributedSampler = DistributedSampler(
        train_set, num_replicas=context.world_size, rank=context.rank, shuffle=True, seed=config.seed
    )
    per_rank = len(sampler)
    # a final batch of one sample breaks BatchNorm in training mode; drop it (Keras would not)
    drop_last = per_rank % batch_size == 1 and per_rank > 1
    if drop_last:
        logger.warning("dropping the last training batch of each epoch: it would hold a single sample")
    train = _loader(config, train_set, batch_size, device, sampler=sampler, drop_last=drop_last)
    val = None
    val_size = len(cast(Sized, val_set))  # covidscan's datasets are map-style, so sized
    if val_size:
        shard = Subset(val_set, range(context.rank, val_size, context.world_size)) if context.enabled else val_set
        val = _loader(config, shard, batch_size, device, sampler=None, drop_last=False)
    return Loaders(train, val, len(cast(Sized, train_set)))


def build_target_loader(
    config: RunConfig, class_names: list[str], stats: NormStats | None, device: torch.device
) -> DataLoader:
    """Unlabelled images of the target site for ``training.domain_adaptation``, preprocessed and
    augmented like the training images, in a seeded random order."""
    adaptation = config.training.domain_adaptation
    if adaptation is None:
        raise ConfigError("training.domain_adaptation is not set")
    samples = target_samples(adaptation.targets, config)
    dataset = build_dataset(config.data, samples, class_names, train=True, stats=stats)
    batch_size = config.training.batch_size
    generator = torch.Generator().manual_seed(config.seed)
    sampler = RandomSampler(dataset, generator=generator)
    logger.info("domain adaptation: %d unlabelled target image(s) from %s", len(samples), adaptation.targets)
    return _loader(config, dataset, batch_size, device, sampler=sampler, drop_last=len(samples) % batch_size == 1)


def target_samples(targets: list[str], config: RunConfig) -> list[Sample]:
    """Unlabelled samples from folders (recursively), image files and CSV manifests (labels dropped)."""
    samples: list[Sample] = []
    for target in targets:
        path = Path(target).expanduser()
        if path.suffix.lower() == ".csv":
            found, _ = read_manifest(path, skip_bad=config.data.skip_bad, labelled=False)
            samples += [Sample(s.path, None, s.patient_id) for s in found]
        else:
            try:
                files = list_inputs([path])
            except DataError as exc:
                raise DataError(f"training.domain_adaptation.target: {exc}") from exc
            samples += [Sample(str(f), None) for f in files]
    if len(samples) < 2:
        raise DataError(
            f"training.domain_adaptation.target {targets} holds {len(samples)} image(s); give at least a batch of the "
            "target site's unlabelled images"
        )
    return samples


def _loader(
    config: RunConfig,
    dataset: Dataset,
    batch_size: int,
    device: torch.device,
    *,
    sampler: Sampler | None,
    drop_last: bool,
) -> DataLoader:
    workers = config.data.num_workers
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=drop_last,
        persistent_workers=workers > 0,
        worker_init_fn=_seed_worker if workers else None,
        prefetch_factor=config.data.prefetch_factor if workers else None,
    )


def _seed_worker(worker_id: int) -> None:
    """Workers get distinct, reproducible NumPy/random streams derived from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
