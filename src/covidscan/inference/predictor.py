"""The one inference path: a :class:`Predictor` built from a run, a checkpoint, an ONNX export or an
ensemble directory, used by evaluate, predict, serve, explain and export.

A predictor is a list of *members* (one, or an ensemble's models), each an engine (PyTorch or ONNX
Runtime) with the preprocessing it was trained with. Members whose preprocessing is equal share one
preprocessed copy of every input (a *view*); the predictor returns the mean of its members'
probabilities, each itself the mean over the test-time augmentation views (identity only unless
asked). Probabilities that are not finite are refused item by item: callers get an error for that
item, never a label next to a NaN.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from covidscan.checkpoint import ModelFileError, build_model_from_config, load_checkpoint
from covidscan.config import RunConfig, config_from_dict
from covidscan.data import DataError, NormStats, Sample, read_image
from covidscan.data.datasets import SampleDataset
from covidscan.errors import UsageError
from covidscan.inference.card import ModelCard, file_sha256
from covidscan.inference.engines import Engine, OnnxEngine, TorchEngine, read_export_metadata
from covidscan.inference.preprocessing import Preprocessing
from covidscan.inference.tta import parse_tta, view_transforms

logger = logging.getLogger(__name__)

NON_FINITE_OUTPUT = (
    "the model's output is not finite (NaN or inf) for this input, so no label is given; NaN/inf pixels or "
    "rescale values in the file usually cause it"
)


class NonFiniteOutputError(DataError):
    """The model gave NaN/inf probabilities for an input: refused rather than labelled."""


@dataclass
class Member:
    """One model of a predictor: how it runs, what it expects, and where it came from."""

    engine: Engine
    preprocessing: Preprocessing
    config: RunConfig
    class_names: list[str]
    card: ModelCard
    source: Path  # the checkpoint or .onnx file
    run_dir: Path | None  # the training run (splits.csv, evaluation/), when known
    explain_model: nn.Module | None = None  # the PyTorch module Grad-CAM differentiates, when available


class Predictor:
    """Class probabilities for preprocessed batches, images, datasets and (see ``predict_study``) studies."""

    def __init__(
        self,
        members: Sequence[Member],
        *,
        tta: str | Sequence[str] | None = None,
        card: ModelCard | None = None,
        source: Path | None = None,
        run_dir: Path | None = None,
    ) -> None:
        if not members:
            raise UsageError("a predictor needs at least one model")
        self.members = list(members)
        _check_compatible(self.members)
        self.views: list[Preprocessing] = []
        self.member_views: list[int] = []  # member i reads views[member_views[i]]
        for member in self.members:
            keys = [view.key for view in self.views]
            if member.preprocessing.key not in keys:
                self.views.append(member.preprocessing)
                keys.append(member.preprocessing.key)
            self.member_views.append(keys.index(member.preprocessing.key))
        self.tta = parse_tta(tta)
        self._tta_transforms = view_transforms(self.tta)
        self.card = card or self.members[0].card
        self.source = source or self.members[0].source
        self.run_dir = run_dir if run_dir is not None or len(self.members) > 1 else self.members[0].run_dir

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        config: RunConfig,
        class_names: Sequence[str],
        norm_stats: NormStats | None = None,
        *,
        tta: str | Sequence[str] | None = None,
        source: str | Path = "<in-memory model>",
    ) -> Predictor:
        """A predictor over a model held in memory (no checkpoint file), e.g. right after training."""
        source = Path(source)
        card = _card(config, list(class_names), source.stem, "", None, {})
        member = Member(
            TorchEngine(model, config.model.head),
            Preprocessing(config.data, norm_stats),
            config,
            list(class_names),
            card,
            source,
            None,
            model,
        )
        return cls([member], tta=tta)

    # ------------------------------------------------------------------ description
    @property
    def class_names(self) -> list[str]:
        return list(self.members[0].class_names)

    @property
    def config(self) -> RunConfig:
        """The (first) member's training config: its data section holds the window and input settings."""
        return self.members[0].config

    @property
    def norm_stats(self) -> NormStats | None:
        return self.members[0].preprocessing.norm_stats

    @property
    def spatial_dims(self) -> int:
        return self.members[0].preprocessing.spatial_dims

    @property
    def engine(self) -> str:
        """``pytorch`` or ``onnxruntime`` (members of an ensemble may mix them: names joined by ``+``)."""
        return "+".join(dict.fromkeys(member.engine.name for member in self.members))

    @property
    def is_ensemble(self) -> bool:
        return len(self.members) > 1

    @property
    def checkpoint_path(self) -> Path:
        return self.source

    @property
    def transform(self):
        """``(H, W)`` image -> ``(C, S, S)`` model input, when all members preprocess alike (2D)."""
        if len(self.views) != 1:
            raise UsageError(
                f"{self.source}: the ensemble's members preprocess images differently; use predictor.preprocess"
            )
        return self.views[0].transform

    @property
    def explainable(self) -> bool:
        return all(member.explain_model is not None for member in self.members)

    @property
    def torch_model(self) -> nn.Module:
        """The PyTorch module (a single-model predictor): what Grad-CAM needs."""
        if self.is_ensemble:
            raise UsageError(f"{self.source}: an ensemble has one PyTorch model per member (predictor.members)")
        self.require_explainable()
        return self.members[0].explain_model  # type: ignore[return-value]

    def require_explainable(self) -> None:
        missing = [m.source for m in self.members if m.explain_model is None]
        if missing:
            raise ExplainUnavailable(
                f"{missing[0]}: an ONNX model cannot be explained: Grad-CAM needs the PyTorch model's gradients. "
                "Explain with the checkpoint it was exported from (run directory or .pt file)"
            )

    def parameter_count(self) -> int:
        return sum(member.engine.parameter_count() for member in self.members)  # type: ignore[attr-defined]

    def describe(self) -> dict[str, Any]:
        """Provenance written next to every prediction: model id, version, checkpoint hash, engine, TTA."""
        return {**self.card.provenance(), "engine": self.engine, "tta": list(self.tta)}

    # ------------------------------------------------------------------ inputs
    def preprocess(self, pixels: np.ndarray) -> list[torch.Tensor]:
        """A decoded ``(H, W)`` [0, 1] image -> one model input per view (2D models)."""
        return [view.image(pixels) for view in self.views]

    def read(self, path: str | Path) -> list[torch.Tensor]:
        """Decode a 2D image file with the models' CT window and preprocess it for every view."""
        return self.preprocess(read_image(path, self.members[0].preprocessing.window, limits=self.config.data.limits))

    def empty_input(self) -> list[torch.Tensor]:
        """Zeros shaped like one item of every view: the placeholder for an input that failed to load."""
        return [torch.zeros(view.input_shape()) for view in self.views]

    def dataset(self, samples: Sequence[Sample]) -> _ViewsDataset:
        """Items ``([view tensors], class index)`` over images (2D) or slice stacks (3D), with
        ``item_samples`` like the data layer's datasets (see :func:`covidscan.data.build_dataset`)."""
        return _ViewsDataset([view.dataset(samples, self.class_names) for view in self.views])

    # ------------------------------------------------------------------ prediction
    def predict_items(self, batch: torch.Tensor | Sequence[torch.Tensor]) -> tuple[np.ndarray, list[str]]:
        """Probabilities ``(N, K)`` and one error per item ("" when fine). A batch is one tensor (a
        single view) or one tensor per view. Items whose probabilities are not finite get an error
        and a row of NaN that must not be used."""
        views = [batch] if isinstance(batch, torch.Tensor) else list(batch)
        if len(views) != len(self.views):
            raise UsageError(f"expected {len(self.views)} input tensor(s), one per preprocessing, got {len(views)}")
        count, classes = len(views[0]), len(self.class_names)
        if count == 0:
            return np.empty((0, classes), np.float32), []
        total = np.zeros((count, classes), np.float64)
        for member, view_index in zip(self.members, self.member_views):
            x = views[view_index]
            for transform in self._tta_transforms:
                probabilities = np.asarray(member.engine(transform(x)), dtype=np.float64)
                if probabilities.shape != (count, classes):
                    raise ModelFileError(
                        f"{member.source}: returned probabilities of shape {probabilities.shape}, expected "
                        f"{(count, classes)} for classes {self.class_names}"
                    )
                total += probabilities
        mean = (total / (len(self.members) * len(self._tta_transforms))).astype(np.float32)
        finite = np.asarray(np.isfinite(mean).all(axis=1))
        mean[~finite] = np.nan
        return mean, ["" if ok else NON_FINITE_OUTPUT for ok in finite]

    def predict_batch(self, batch: torch.Tensor | Sequence[torch.Tensor]) -> np.ndarray:
        """Probabilities ``(N, K)``; raises :class:`NonFiniteOutputError` if any item's are not finite."""
        probabilities, errors = self.predict_items(batch)
        bad = [i for i, error in enumerate(errors) if error]
        if bad:
            raise NonFiniteOutputError(f"items {bad[:10]} of the batch: {NON_FINITE_OUTPUT}")
        return probabilities

    def predict_study(self, study: str | Path, **options: Any):
        """One verdict for a whole study (DICOM series folder or zip, NIfTI file, folder of slices):
        see :func:`covidscan.inference.studies.predict_study` for the options and the result."""
        from covidscan.inference.studies import predict_study

        return predict_study(self, study, **options)

    def predict_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities ``(K,)`` for one decoded ``(H, W)`` [0, 1] image (2D models)."""
        return self.predict_batch([view[None] for view in self.preprocess(pixels)])[0]


class ExplainUnavailable(UsageError):
    """The predictor has no PyTorch model to differentiate (an ONNX export without its checkpoint)."""


class _ViewsDataset(Dataset):
    """Zips one dataset per view: item ``i`` is every view's tensor for the same image or stack."""

    def __init__(self, datasets: list[SampleDataset]) -> None:
        lengths = {len(dataset) for dataset in datasets}
        if len(lengths) != 1:
            raise ModelFileError(f"ensemble members cut the inputs into different numbers of items: {sorted(lengths)}")
        self.datasets = datasets

    def __len__(self) -> int:
        return len(self.datasets[0])

    @property
    def item_samples(self) -> list[Sample]:
        return self.datasets[0].item_samples

    def __getitem__(self, index: int) -> tuple[list[torch.Tensor], int]:
        items = [dataset[index] for dataset in self.datasets]
        return [tensor for tensor, _ in items], items[0][1]


def _check_compatible(members: list[Member]) -> None:
    """Members must agree on what they predict and on how inputs are decoded and cut into items."""
    first = members[0]
    for member in members[1:]:
        if member.class_names != first.class_names:
            raise ModelFileError(
                f"{member.source}: classes {member.class_names} differ from {first.source}'s {first.class_names}; "
                "ensemble members must predict the same classes in the same order"
            )
        a, b = first.preprocessing, member.preprocessing
        if a.spatial_dims != b.spatial_dims:
            raise ModelFileError(f"{member.source}: mixes 2D and 3D models; ensemble members must all be one kind")
        if (asdict(a.window) if a.window else None) != (asdict(b.window) if b.window else None):
            raise ModelFileError(
                f"{member.source}: CT window {b.window} differs from {first.source}'s {a.window}; ensemble "
                "members must decode DICOM/NIfTI with one window"
            )
        if a.spatial_dims == 3:
            layout = ("depth", "volume.stride", "volume.z_spacing")
            values = [
                (d.depth, d.volume.stride or d.depth, d.volume.z_spacing) for d in (a.data, b.data)
            ]  # what decides how a scan is cut into stacks
            if values[0] != values[1]:
                raise ModelFileError(
                    f"{member.source}: 3D ensemble members must cut scans into the same stacks ({', '.join(layout)}): "
                    f"{values[1]} vs {values[0]}"
                )


def _card(
    config: RunConfig,
    class_names: list[str],
    model_id: str,
    sha256: str,
    epoch: int | None,
    metrics: dict[str, Any],
) -> ModelCard:
    data = config.data
    return ModelCard(
        model_id=model_id,
        architecture=config.model.name,
        class_names=class_names,
        input_size=data.image_size,
        channels=data.channels,
        normalize=data.normalize,
        head=config.model.head,
        checkpoint_sha256=sha256,
        epoch=epoch,
        metrics={k: float(v) for k, v in metrics.items() if isinstance(v, int | float)},
        spatial_dims=data.spatial_dims,
        depth=data.depth if data.spatial_dims == 3 else None,
    )


def load_checkpoint_member(path: str | Path, device: str | torch.device = "cpu") -> Member:
    """A run directory or ``.pt`` file as a PyTorch member (weights read without unpickling code)."""
    payload = load_checkpoint(path)
    config = config_from_dict(payload["config"])
    class_names = list(payload["class_names"])
    model = build_model_from_config(config, len(class_names))
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise ModelFileError(
            f"{payload['path']}: its weights do not fit model {config.model.name!r} as this covidscan "
            f"version builds it (was the checkpoint made by another version, or edited?): "
            f"{str(exc).splitlines()[0]} ..."
        ) from None
    model.eval().to(device)
    stats = payload.get("norm_stats")
    source = Path(payload["path"])
    run_dir = source.parent.parent if source.parent.name == "checkpoints" else source.parent
    card = _card(
        config, class_names, run_dir.name, file_sha256(source), payload.get("epoch"), payload.get("metrics") or {}
    )
    return Member(
        TorchEngine(model, config.model.head),
        Preprocessing(config.data, NormStats(**stats) if stats else None),
        config,
        class_names,
        card,
        source,
        run_dir,
        model,
    )


def load_onnx_member(
    path: str | Path, checkpoint: str | Path | None = None, *, threads: int | None = None, device="cpu"
) -> Member:
    """An exported model run by ONNX Runtime; with ``checkpoint`` (the run it was exported from) it
    can also be explained, and evaluated on the run's own splits."""
    path = Path(path)
    metadata = read_export_metadata(path)
    try:
        config = config_from_dict(metadata["config"])
        card = ModelCard(**metadata["card"])
    except (KeyError, TypeError) as exc:
        raise ModelFileError(
            f"{path}.json: incomplete export metadata ({exc}); re-export with `covidscan export`"
        ) from None
    stats = metadata.get("norm_stats")
    engine = OnnxEngine(path, threads=threads)
    recorded = metadata.get("run_dir")
    run_dir = Path(recorded) if recorded and (Path(recorded) / "splits.csv").is_file() else None
    explain_model = None
    if checkpoint is not None:
        torch_member = load_checkpoint_member(checkpoint, device)
        if torch_member.card.checkpoint_sha256 != card.checkpoint_sha256:
            raise ModelFileError(
                f"{path} was exported from a checkpoint with SHA-256 {card.checkpoint_sha256[:12]}, but "
                f"{torch_member.source} is {torch_member.card.checkpoint_sha256[:12]}: not the same model. "
                "Export the checkpoint again, or give the matching one"
            )
        explain_model, run_dir = torch_member.explain_model, torch_member.run_dir
    return Member(
        engine,
        Preprocessing(config.data, NormStats(**stats) if stats else None),
        config,
        list(card.class_names),
        card,
        path,
        run_dir,
        explain_model,
    )


def load_predictor(
    source: str | Path | None = None,
    onnx: str | Path | None = None,
    *,
    tta: str | Sequence[str] | None = None,
    threads: int | None = None,
    device: str | torch.device = "cpu",
) -> Predictor:
    """The predictor for a run directory, a ``.pt`` checkpoint, an ensemble directory or an ``.onnx``
    export (as ``source``, or as ``onnx`` together with the checkpoint it came from, which then
    serves Grad-CAM and the run's splits). ``tta``: test-time augmentation views (see ``tta.py``);
    ``threads``: CPU threads for PyTorch and ONNX Runtime."""
    if threads:
        torch.set_num_threads(threads)
    if onnx is None and source is not None and str(source).lower().endswith(".onnx"):
        source, onnx = None, source
    if source is None and onnx is None:
        raise UsageError("give a checkpoint (run directory or .pt file), an ensemble directory or an .onnx model")
    if onnx is not None:
        return Predictor([load_onnx_member(onnx, source, threads=threads, device=device)], tta=tta)
    from covidscan.inference.ensemble import is_ensemble_dir, load_ensemble

    assert source is not None  # checked above: one of source and onnx is given
    if is_ensemble_dir(source):
        return load_ensemble(source, tta=tta, threads=threads, device=device)
    return Predictor([load_checkpoint_member(source, device)], tta=tta)
