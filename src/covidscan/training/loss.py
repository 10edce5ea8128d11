"""The training loss: softmax + cross-entropy or sigmoid + binary cross-entropy, Keras class weights."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from covidscan.data import DataError


class ClassificationLoss(nn.Module):
    """Softmax + cross-entropy or sigmoid + binary cross-entropy on one-hot targets.

    Class weights scale each sample's loss and the batch mean divides by the batch size, as Keras'
    ``class_weight`` does (PyTorch's ``weight=`` would divide by the summed weights instead).
    ``per_sample`` is the unweighted loss, which validation reports.
    """

    class_weights: torch.Tensor | None  # a buffer: follows the module to its device

    def __init__(self, head: str, num_classes: int, class_weights: torch.Tensor | None = None) -> None:
        super().__init__()
        self.head = head
        self.num_classes = num_classes
        self.register_buffer("class_weights", class_weights, persistent=False)

    def per_sample(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.head == "sigmoid":
            one_hot = F.one_hot(targets, self.num_classes).to(logits.dtype)
            return F.binary_cross_entropy_with_logits(logits, one_hot, reduction="none").mean(dim=1)
        return F.cross_entropy(logits, targets, reduction="none")

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        losses = self.per_sample(logits, targets)
        if self.class_weights is not None:
            losses = losses * self.class_weights[targets]
        return losses.mean()


def balanced_class_weights(labels: Sequence[int], class_names: Sequence[str]) -> torch.Tensor:
    """scikit-learn's ``balanced`` weights: n_samples / (n_classes * count(class))."""
    from sklearn.utils.class_weight import compute_class_weight

    label_array = np.asarray(labels)
    missing = [name for i, name in enumerate(class_names) if not np.any(label_array == i)]
    if missing:
        raise DataError(
            f"class(es) {missing} have no training samples, so balanced class weights are undefined; "
            "add samples, change the split, or set training.class_weights: none"
        )
    weights = compute_class_weight("balanced", classes=np.arange(len(class_names)), y=label_array)
    return torch.tensor(weights, dtype=torch.float32)
