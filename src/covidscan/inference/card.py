"""Model provenance: what every output says about the model that produced it."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from covidscan import __version__


@dataclass(frozen=True)
class ModelCard:
    """A model's identity, classes and input: travels with every prediction, and beside exports."""

    model_id: str  # the run directory's (or ensemble directory's) name
    architecture: str
    class_names: list[str]
    input_size: int
    channels: int
    normalize: str
    head: str
    checkpoint_sha256: str  # of the checkpoint file; for an ensemble, of its members' hashes
    epoch: int | None
    covidscan_version: str = __version__
    metrics: dict[str, float] = field(default_factory=dict)
    spatial_dims: int = 2
    depth: int | None = None  # slices per stack (3D models)
    members: list[dict[str, Any]] = field(default_factory=list)  # an ensemble's member cards

    @property
    def version(self) -> str:
        """Package version + checkpoint hash + epoch: changes whenever the weights change."""
        epoch = "" if self.epoch is None else f".e{self.epoch}"
        return f"{self.covidscan_version}+{self.checkpoint_sha256[:12]}{epoch}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "version": self.version}

    def provenance(self) -> dict[str, Any]:
        """The short form written into prediction outputs: id, version and checkpoint hash."""
        return {"model_id": self.model_id, "model_version": self.version, "checkpoint_sha256": self.checkpoint_sha256}


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
