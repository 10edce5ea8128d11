"""Is a resume valid? Checked before anything is written, so a refused resume leaves the run as it was.

A resumed run continues the *same* experiment: its model, data and the phases it has started stay
as they were. How it runs may change (device, AMP, workers, caches), and so may what is still to
come: more epochs in the current phase (``--set training.phases.0.epochs=20``), later phases. A
change to anything else is refused with the keys named, instead of failing half-way (weights that
do not fit) after ``config.yaml`` was already overwritten, which left the run unresumable.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from covidscan.checkpoint import LAST_NAME, load_checkpoint
from covidscan.config import ConfigError, RunConfig, config_from_dict

# dotted config keys (and their sub-keys) that may differ on resume: how the run executes, not what it trains
CHANGEABLE_ON_RESUME = (
    "name",
    "output_dir",
    "data.split",  # a resume always reloads the run's own splits.csv
    "data.positive_class",  # which class binary metrics report; training does not use it
    "data.num_workers",
    "data.prefetch_factor",
    "data.volume.cache_scans",
    "data.volume.cache_dir",
    "model.pretrained",  # the weights come from last.pt
    "model.weights",
    "training.device",
    "training.amp",
    "training.amp_dtype",
    "training.channels_last",
    "training.compile",
    "training.deterministic",
    "training.strict_leakage",
)
_MISSING = object()
_PHASE_KEY = re.compile(r"^training\.phases\.(\d+)(?:\.(.+))?$")


def resume_checkpoint(run_dir: Path, config: RunConfig) -> dict[str, Any]:
    """``run_dir``'s ``last.pt``, once it is known that ``config`` may continue it (reads only)."""
    path = Path(run_dir) / "checkpoints" / LAST_NAME
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no checkpoints/{LAST_NAME} to resume from (did the run finish an epoch?)")
    checkpoint = load_checkpoint(path)
    state = checkpoint.get("training_state")
    if not state:
        raise ConfigError(f"{path}: no training state to resume from")
    check_resumable(config_from_dict(checkpoint["config"]), config, state["position"]["phase"], run_dir)
    return checkpoint


def check_resumable(saved: RunConfig, config: RunConfig, phase: int, run_dir: str | Path = "the run") -> None:
    """Raise ``ConfigError`` naming every key of ``config`` that a resume of ``saved`` (stopped in
    phase index ``phase``) may not change."""
    before, after = _leaves(saved.to_dict()), _leaves(config.to_dict())
    changed = [
        key
        for key in sorted(set(before) | set(after), key=_natural)
        if not _same(before.get(key, _MISSING), after.get(key, _MISSING)) and not _changeable(key, phase)
    ]
    if changed:
        first = changed[0]
        more = f" (and {len(changed) - 1} more: {', '.join(changed[1:])})" if len(changed) > 1 else ""
        raise ConfigError(
            f"cannot resume {run_dir}: {first} was {_show(before.get(first, _MISSING))} but is now "
            f"{_show(after.get(first, _MISSING))}{more}; a resumed run keeps its model, data and started phases "
            "(only later epochs and phases, and device/AMP/worker settings, may change), so start a new run "
            "for this change"
        )


def _changeable(key: str, phase: int) -> bool:
    if any(key == prefix or key.startswith(prefix + ".") for prefix in CHANGEABLE_ON_RESUME):
        return True
    match = _PHASE_KEY.match(key)
    if match is None:
        return False
    index, field = int(match.group(1)), match.group(2)
    return index > phase or field == "epochs"  # phases not yet started, or a longer/shorter current one


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": [1, {"c": 2}]}}`` -> ``{"a.b.0": 1, "a.b.1.c": 2}``."""
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        tree = dataclasses.asdict(tree)
    if isinstance(tree, dict) and tree:
        items = [(str(k), v) for k, v in tree.items()]
    elif isinstance(tree, (list, tuple)) and tree:
        items = [(str(i), v) for i, v in enumerate(tree)]
    else:
        return {prefix: tree}
    leaves: dict[str, Any] = {}
    for key, value in items:
        leaves.update(_leaves(value, f"{prefix}.{key}" if prefix else key))
    return leaves


def _same(a: Any, b: Any) -> bool:
    """Equal, or two spellings (relative, absolute) of one existing path."""
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str) and Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return False


def _natural(key: str) -> list[tuple[int, Any]]:
    """Sort key putting ``phases.2`` before ``phases.10``."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in key.split(".")]


def _show(value: Any) -> str:
    return "absent" if value is _MISSING else repr(value)
