"""Plotting changes no global matplotlib state: importing covidscan and drawing every kind of figure
leaves the user's backend and pyplot's list of open figures as they were (a notebook keeps working)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Runs in a fresh interpreter: the backend is chosen once per process, so only a new process shows
# whether importing covidscan (or plotting) switches it. "svg" stands for a user's own backend.
SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import matplotlib
    import matplotlib.pyplot as plt

    before = matplotlib.get_backend()
    import covidscan  # noqa: F401
    import numpy as np
    import optuna

    from covidscan.data.audit import ImageFacts, plot_nearest_train_distances
    from covidscan.data.records import Sample
    from covidscan.evaluation.calibration import reliability_table
    from covidscan.evaluation.metrics import PredictionSet
    from covidscan.evaluation.plots import plot_confusion, plot_prediction_grid, plot_reliability, plot_roc_pr
    from covidscan.explain.overlay import render_montage, render_overlay
    from covidscan.tracking.sweep import plot_param_importances
    from covidscan.training.history import plot_history

    assert matplotlib.get_backend() == before, ("import switched the backend", before, matplotlib.get_backend())
    out = Path(sys.argv[1])
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 10)
    proba = np.clip(np.stack([1 - y, y], axis=1) * 0.6 + rng.random((20, 2)) * 0.4, 0, None)
    proba /= proba.sum(axis=1, keepdims=True)
    predictions = PredictionSet(y, proba, ["COVID", "normal"])
    written = [
        plot_confusion(np.array([[7, 3], [2, 8]]), ["COVID", "normal"], out / "confusion.png"),
        plot_roc_pr(predictions, 0, out / "roc_pr.png"),
        plot_reliability(reliability_table(proba, y, n_bins=5), out / "reliability.png"),
        plot_prediction_grid([rng.random((16, 16))] * 3, ["a", "b", "a"], ["a", "a", "a"], out / "grid.png"),
        *plot_history(
            [
                {"epoch": e, "phase": e // 2, "loss": 1 / e, "accuracy": 0.5, "val_loss": 1.0, "val_accuracy": 0.5}
                | ({"domain_accuracy": 0.5} if e > 1 else {})  # a callback's column (callback_metrics.png)
                for e in (1, 2, 3)
            ],
            out / "history",
        ),
        plot_nearest_train_distances(
            [
                ImageFacts(Sample(f"{i}.png", "a", split=split), phash=rng.integers(0, 2**63, 1, dtype=np.uint64))
                for i, split in enumerate(["train"] * 4 + ["val", "test"])
            ],
            threshold=4,
            path=out / "nearest.png",
        ),
    ]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1) + 0.1 * trial.suggest_float("y", 0, 1), n_trials=6)
    written.append(plot_param_importances(study, out / "importance.png"))
    pngs = [render_overlay(rng.random((16, 16)), rng.random((4, 4)), "cam")]
    pngs.append(render_montage(rng.random((3, 16, 16)), rng.random((3, 4, 4)), "cam"))

    assert all(p is not None and p.stat().st_size > 0 for p in written), written
    assert all(png.startswith(b"\\x89PNG") for png in pngs)
    assert matplotlib.get_backend() == before, ("plotting switched the backend", before, matplotlib.get_backend())
    assert plt.get_fignums() == [], plt.get_fignums()
    print(len(written) + len(pngs), "figures")
    """
)


def test_plots_leave_backend_and_pyplot_figures_alone(tmp_path):
    env = {**os.environ, "MPLBACKEND": "svg", "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "11 figures"
