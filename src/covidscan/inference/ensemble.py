"""Ensembles: several trained runs used as one model (the mean of their class probabilities).

``make_ensemble(runs, out)`` writes a self-contained directory that every command takes like a run::

    DIR/ensemble.json                    members (name, SHA-256, architecture), combine rule, classes
    DIR/members/<run name>/checkpoints/best.pt   a copy of each member's checkpoint
    DIR/members/<run name>/config.yaml   the member's training config, for reading
    DIR/splits.csv                       only when every member was trained on the same splits

Members must predict the same classes and decode inputs alike (CT window; for 3D, the same slice
stacks); image size, channels, normalisation and architecture may differ, and each member then
gets its own preprocessing. Without a shared ``splits.csv`` the ensemble has no "own" test split
(one member's test images may be another's training images): evaluate it with ``--data``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from covidscan import __version__
from covidscan.checkpoint import ModelFileError, resolve_checkpoint
from covidscan.data.splits import load_splits
from covidscan.errors import UsageError
from covidscan.inference.card import ModelCard, file_sha256
from covidscan.inference.predictor import Member, Predictor, load_checkpoint_member
from covidscan.runtime import atomic_path, write_json

ENSEMBLE_FILE = "ensemble.json"
ENSEMBLE_FORMAT = "covidscan-ensemble/1"
COMBINE_RULE = "mean of the members' class probabilities"


def is_ensemble_dir(path: str | Path | None) -> bool:
    return path is not None and (Path(path) / ENSEMBLE_FILE).is_file()


def make_ensemble(runs: Sequence[str | Path], out: str | Path) -> Path:
    """Check that ``runs`` fit together, then write the ensemble directory ``out``; return it."""
    if len(runs) < 2:
        raise UsageError("an ensemble needs at least two runs")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out}: exists and is not empty; choose a new --out directory")
    members = [load_checkpoint_member(run) for run in runs]
    Predictor(members)  # raises with the member and the reason when they do not fit together
    names = _unique_names([m.run_dir.name if m.run_dir else m.source.stem for m in members])
    records = []
    for name, member in zip(names, members):
        target = out / "members" / name / "checkpoints" / "best.pt"
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            shutil.copyfile(member.source, tmp)
        config_file = member.run_dir / "config.yaml" if member.run_dir else None
        if config_file is not None and config_file.is_file():
            shutil.copyfile(config_file, out / "members" / name / "config.yaml")
        records.append(
            {
                "name": name,
                "checkpoint": f"members/{name}/checkpoints/best.pt",
                "checkpoint_sha256": member.card.checkpoint_sha256,
                "architecture": member.card.architecture,
                "epoch": member.card.epoch,
                "trained_from": str(member.source.resolve()),
            }
        )
    splits = _shared_splits(members)
    if splits is not None:
        shutil.copyfile(splits, out / "splits.csv")
    write_json(
        out / ENSEMBLE_FILE,
        {
            "format": ENSEMBLE_FORMAT,
            "combine": COMBINE_RULE,
            "class_names": members[0].class_names,
            "members": records,
            "shared_splits": splits is not None,
            "covidscan_version": __version__,
        },
    )
    return out


def load_ensemble(
    path: str | Path,
    *,
    tta: str | Sequence[str] | None = None,
    threads: int | None = None,
    device: str | torch.device = "cpu",
) -> Predictor:
    """The predictor of an ensemble directory; each member's checkpoint is checked against its hash."""
    path = Path(path)
    spec = _read_spec(path)
    members: list[Member] = []
    for record in spec["members"]:
        file = path / record["checkpoint"]
        resolve_checkpoint(file)
        if file_sha256(file) != record["checkpoint_sha256"]:
            raise ModelFileError(
                f"{file}: changed since the ensemble was made (SHA-256 differs from {path / ENSEMBLE_FILE}); "
                "make the ensemble again with `covidscan ensemble`"
            )
        member = load_checkpoint_member(file, device)
        member.run_dir = None  # a member's own splits are not the ensemble's
        members.append(member)
    card = ensemble_card(path.name, members)
    return Predictor(members, tta=tta, card=card, source=path, run_dir=path)


def ensemble_card(name: str, members: Sequence[Member]) -> ModelCard:
    """One card for the ensemble: its hash covers every member's checkpoint hash and the combine rule."""
    first = members[0].card
    digest = hashlib.sha256("\n".join([COMBINE_RULE, *(m.card.checkpoint_sha256 for m in members)]).encode())
    return ModelCard(
        model_id=name,
        architecture="ensemble(" + ", ".join(m.card.architecture for m in members) + ")",
        class_names=list(first.class_names),
        input_size=first.input_size,
        channels=first.channels,
        normalize=first.normalize,
        head=first.head,
        checkpoint_sha256=digest.hexdigest(),
        epoch=None,
        spatial_dims=first.spatial_dims,
        depth=first.depth,
        members=[m.card.to_dict() for m in members],
    )


def _read_spec(path: Path) -> dict[str, Any]:
    file = path / ENSEMBLE_FILE
    try:
        spec = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{file}: not a readable ensemble description ({exc})") from None
    if not isinstance(spec, dict) or spec.get("format") != ENSEMBLE_FORMAT or not spec.get("members"):
        raise ModelFileError(f"{file}: not a covidscan ensemble (format {ENSEMBLE_FORMAT} with members expected)")
    return spec


def _unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return unique


def _shared_splits(members: Sequence[Member]) -> Path | None:
    """The members' common ``splits.csv``, or None when any lacks one or they assign differently.

    Compared by what they assign (path, label, patient, split), not byte for byte: a run written
    before ``splits.csv`` gained its ``source`` column holds the same split in another layout."""
    files = [m.run_dir / "splits.csv" if m.run_dir else None for m in members]
    if any(f is None or not f.is_file() for f in files):
        return None
    assignments = {
        frozenset((s.path, s.label, s.patient_id, s.split) for s in load_splits(f).samples)
        for f in files
        if f is not None
    }
    return files[0] if len(assignments) == 1 else None
