"""Domain-adversarial training (DANN: Ganin & Lempitsky, ICML 2015; Ganin et al., JMLR 2016).

A model trained on one hospital's scans scores at chance on another's (benchmarks/README.md): its
features tell the sources apart. DANN adds a small domain classifier on the backbone's pooled
features that learns to tell training images from *unlabelled* images of the target site, and a
gradient-reversal layer between them, so the backbone is pushed toward features the domain
classifier cannot separate while the label head still learns the labels. The reversal coefficient
ramps from 0 to ``weight`` with DANN's schedule ``2 / (1 + exp(-10 p)) - 1`` over the run's steps.

Written here because no library the project uses ships it for an arbitrary registry model:
MONAI and timm have no DANN, and the dedicated packages (``pytorch-adapt``, ``ADAPT``) bring their
own training loops. It is one :class:`~covidscan.training.callbacks.Callback`: the domain
classifier, its optimizer and the ramp position are its state (saved in ``last.pt``, so a resumed run
continues them); the model and its checkpoints stay plain registry models.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from covidscan.errors import UsageError
from covidscan.training.callbacks import Callback

if TYPE_CHECKING:
    from covidscan.training.loop import TrainingLoop


NOT_DISTRIBUTED = (
    "domain-adversarial training does not run under torchrun yet (its domain classifier is not synchronised "
    "across processes); train on one process"
)


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; the gradient times ``-coefficient`` backward."""

    @staticmethod
    def forward(ctx: Any, features: torch.Tensor, coefficient: float) -> torch.Tensor:
        ctx.coefficient = coefficient
        return features.view_as(features)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.coefficient * grad, None


def reverse_gradient(features: torch.Tensor, coefficient: float) -> torch.Tensor:
    """The gradient-reversal layer: ``features`` unchanged, their gradient scaled by ``-coefficient``."""
    return _ReverseGradient.apply(features, coefficient)


def dann_coefficient(progress: float, weight: float) -> float:
    """DANN's ramp: 0 at the start of training, ``weight`` in the limit (0.987 x weight at the end)."""
    return weight * (2.0 / (1.0 + math.exp(-10.0 * min(max(progress, 0.0), 1.0))) - 1.0)


class DomainAdversarial(Callback):
    """Align the backbone's features of the training images with those of ``target`` images.

    ``target`` yields batches ``(images, anything)`` preprocessed like the training images (labels are
    ignored). ``weight`` is the largest gradient-reversal coefficient, ``hidden`` the domain
    classifier's width, ``lr`` its Adam learning rate. Logs ``domain_loss`` and ``domain_accuracy``
    (0.5: the domain classifier cannot tell the sites apart) and ``domain_coefficient`` per epoch.
    """

    def __init__(self, target: DataLoader, *, weight: float = 1.0, hidden: int = 256, lr: float = 1e-3) -> None:
        if weight <= 0 or hidden < 1 or lr <= 0:
            raise UsageError(
                f"DomainAdversarial needs weight > 0, hidden >= 1 and lr > 0; got {weight}, {hidden}, {lr}"
            )
        self.target = target
        self.weight = weight
        self.hidden = hidden
        self.lr = lr
        self.classifier: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.restored: dict[str, Any] | None = None  # a resumed state, applied once the classifier exists
        self.coefficient = 0.0
        self._batches: Iterator | None = None
        self._features: torch.Tensor | None = None
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self._sums: torch.Tensor | None = None  # loss sum, correct, count of the running epoch

    # ------------------------------------------------------------------ set-up and state
    def on_fit_start(self, loop: TrainingLoop) -> None:
        if loop.context.enabled:
            raise UsageError(NOT_DISTRIBUTED)
        backbone = getattr(loop.model, "backbone", None)
        if not isinstance(backbone, nn.Module):
            raise UsageError(
                f"domain-adversarial training needs a registry model with a backbone, not {type(loop.model).__name__}"
            )
        channels = self._feature_channels(loop, backbone)
        self.classifier = nn.Sequential(
            nn.Linear(channels, self.hidden), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(self.hidden, 1)
        ).to(loop.device)
        self.optimizer = torch.optim.Adam(self.classifier.parameters(), lr=self.lr)
        if self.restored is not None:
            self.classifier.load_state_dict(self.restored["classifier"])
            self.optimizer.load_state_dict(self.restored["optimizer"])
        self._hook = backbone.register_forward_hook(self._capture)

    def _feature_channels(self, loop: TrainingLoop, backbone: nn.Module) -> int:
        images, _ = next(iter(self.target))
        was_training = loop.model.training
        loop.model.eval()
        with torch.no_grad():
            features = backbone(images[:1].to(loop.device))
        loop.model.train(was_training)
        return int(features.shape[1])

    def _capture(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if module.training:  # training forwards only: validation and test leave no reference behind
            self._features = output

    def on_fit_end(self, loop: TrainingLoop) -> None:
        self._release()

    def on_exception(self, loop: TrainingLoop, error: BaseException) -> None:
        self._release()

    def _release(self) -> None:
        if self._hook is not None:
            self._hook.remove()
        self._hook, self._features, self._batches = None, None, None

    def state_dict(self) -> dict[str, Any]:
        if self.classifier is None or self.optimizer is None:
            return self.restored or {}
        return {"classifier": self.classifier.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.restored = state or None

    # ------------------------------------------------------------------ training
    def _next_target(self) -> torch.Tensor:
        if self._batches is None:
            self._batches = iter(self.target)
        try:
            images, _ = next(self._batches)
        except StopIteration:  # the target set is smaller than the training set: go round again
            self._batches = iter(self.target)
            images, _ = next(self._batches)
        return images

    def training_loss(self, loop: TrainingLoop, images: torch.Tensor) -> torch.Tensor:
        if self.classifier is None or self._features is None:
            raise RuntimeError("DomainAdversarial.training_loss ran before on_fit_start or a training forward")
        source = _pool(self._features)
        loop.forward_model(self._next_target().to(loop.device, non_blocking=True, memory_format=loop.memory_format))
        target = _pool(self._features)
        self._features = None
        total = sum(p.epochs for p in loop.phases) * max(len(loop.train_loader), 1)
        self.coefficient = dann_coefficient(loop.step / total, self.weight)
        features = reverse_gradient(torch.cat([source, target]).float(), self.coefficient)
        logits = self.classifier(features).squeeze(1)
        domains = torch.cat([torch.zeros(len(source)), torch.ones(len(target))]).to(logits.device)
        loss = F.binary_cross_entropy_with_logits(logits, domains)
        batch = torch.stack(
            [
                loss.detach().double() * len(domains),
                ((logits.detach() > 0) == domains.bool()).sum().double(),
                torch.tensor(float(len(domains)), dtype=torch.float64, device=logits.device),
            ]
        )
        self._sums = batch if self._sums is None else self._sums + batch
        return loss

    def on_train_batch_end(self, loop: TrainingLoop, loss: Any) -> None:
        if self.classifier is None or self.optimizer is None:
            return
        if loop.scaler is not None and loop.scaler.is_enabled():  # float16 AMP scaled our gradients too
            scale = loop.scaler.get_scale()
            grads = [p.grad for p in self.classifier.parameters() if p.grad is not None]
            if not all(torch.isfinite(g).all() for g in grads):
                self.optimizer.zero_grad(set_to_none=True)
                return
            for grad in grads:
                grad.div_(scale)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def epoch_metrics(self, loop: TrainingLoop) -> dict[str, float]:
        sums, self._sums = self._sums, None
        if sums is None:
            return {}
        loss, correct, count = sums.tolist()
        return {
            "domain_loss": loss / max(count, 1),
            "domain_accuracy": correct / max(count, 1),
            "domain_coefficient": self.coefficient,
        }


def _pool(features: torch.Tensor) -> torch.Tensor:
    """Global average over the spatial dimensions (2D or 3D feature maps), as the label head sees them."""
    return features.flatten(2).mean(dim=2) if features.dim() > 2 else features
