"""Slice- or stack-level predictions -> one prediction per patient (or per volume)."""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np

from covidscan.errors import UsageError
from covidscan.evaluation.metrics import PredictionSet

logger = logging.getLogger(__name__)

Aggregation = Literal["mean", "max"]


def aggregate_by_patient(predictions: PredictionSet, method: Aggregation = "mean") -> PredictionSet:
    """One row per patient: the mean, or the per-class maximum renormalised to sum to 1, of its
    items' probabilities. Items without a patient id stand alone (keyed by path).

    A patient whose items disagree on the label gets the majority label, with a warning: labels are
    normally per patient, so this points at a labelling problem.
    """
    if method not in ("mean", "max"):
        raise UsageError(f"aggregation must be 'mean' or 'max', got {method!r}")
    groups = predictions.groups()
    keys, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    order = np.argsort(first)  # patients in first-seen order
    k = predictions.num_classes
    proba = np.zeros((len(keys), k))
    if method == "mean":
        np.add.at(proba, inverse, predictions.proba)
        proba /= np.bincount(inverse)[:, None]
    else:
        np.maximum.at(proba, inverse, predictions.proba)
        proba /= proba.sum(axis=1, keepdims=True)
    votes = np.zeros((len(keys), k), dtype=int)
    np.add.at(votes, (inverse, predictions.y_true), 1)
    mixed = int(np.sum((votes > 0).sum(axis=1) > 1))
    if mixed:
        logger.warning("%d patient(s) have items with different labels; using each one's majority label", mixed)
    patient_ids = [predictions.patient_ids[i] or predictions.paths[i] for i in first[order]]
    return PredictionSet(
        votes.argmax(axis=1)[order],
        proba[order],
        predictions.class_names,
        paths=[predictions.paths[i] for i in first[order]],
        patient_ids=patient_ids,
    )
