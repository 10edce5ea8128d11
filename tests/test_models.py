"""2D model zoo: every entry builds and trains, heads, freezing semantics, the study B parameter count."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from covidscan.models import create_model, keras_parameter_count, list_models, set_trainable
from covidscan.models.freezing import parameter_layers
from covidscan.models.heads import L2Linear

MODELS_2D = list_models(spatial_dims=2)
MIN_SIZE = {"alexnet": 64}  # AlexNet's 11x11/stride-4 stem and three max-pools need >= 63 px


def test_registry_lists_the_study_models():
    expected = {
        "cnn1",
        "cnn2",
        "cnn3",
        "sepconv",
        "alexnet",
        "vgg16",
        "resnet18",
        "resnet50",
        "resnet101",
        "densenet121",
        "mobilenet",
        "xception",
        "efficientnet_b0",
    }
    assert expected <= set(MODELS_2D)


@pytest.mark.parametrize("name", MODELS_2D)
def test_every_model_trains_one_step_on_grayscale_input(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, in_channels=1)
    size = MIN_SIZE.get(name, 32)
    x = torch.randn(2, 1, size, size)
    logits = model(x)
    assert logits.shape == (2, 3)
    nn.functional.cross_entropy(logits, torch.tensor([0, 2])).backward()
    first, last = next(model.backbone.parameters()), list(model.head.parameters())[-1]
    assert first.grad is not None and first.grad.abs().sum() > 0
    assert last.grad is not None and last.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["cnn1", "resnet18", "xception"])
def test_rgb_input_and_feature_map_backbone(name):
    model = create_model(name, num_classes=2).eval()
    features = model.backbone(torch.randn(1, 3, 64, 64))
    assert features.ndim == 4  # the backbone returns a feature map, the head pools it
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2)


def test_sepconv_has_the_papers_616739_keras_parameters():
    model = create_model("sepconv", num_classes=3)
    assert keras_parameter_count(model) == 616_739
    # one class fewer removes one output unit of the last dense layer: 64 weights + 1 bias
    assert keras_parameter_count(model) - keras_parameter_count(create_model("sepconv", num_classes=2)) == 65


def test_invalid_arguments_are_rejected_with_clear_messages():
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        create_model("cnn1", num_classes=1)
    with pytest.raises(ValueError, match="Available: .*resnet50"):
        create_model("resnet5O", num_classes=2)
    with pytest.raises(ValueError, match="unknown model option.*poolng"):
        create_model("cnn1", num_classes=2, poolng="avg")
    with pytest.raises(ValueError, match="custom network without ImageNet weights"):
        create_model("cnn2", num_classes=2, pretrained=True)
    with pytest.raises(ValueError, match="unknown head"):
        create_model("cnn1", num_classes=2, head="fancy")


def test_flatten_pooling_sizes_the_dense_layer_from_the_input_size():
    with pytest.raises(ValueError, match="input_size"):
        create_model("cnn1", num_classes=2, pooling="flatten")
    model = create_model("cnn1", num_classes=2, pooling="flatten", input_size=48)
    first_dense = next(m for m in model.head if isinstance(m, nn.Linear))
    assert first_dense.in_features == 128 * 6 * 6  # three 2x2 max-pools: 48 -> 6
    assert model(torch.randn(2, 3, 48, 48)).shape == (2, 2)


def test_head_overrides_pass_through_create_model():
    model = create_model("resnet18", num_classes=2, hidden=[32], dropout=0.25)
    kinds = [type(m) for m in model.head]
    assert kinds == [nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert model.head[4].p == 0.25 and model.head[2].out_features == 32


def test_study_e_head_and_its_l2_penalty():
    model = create_model("cnn1", num_classes=2, head="study_e")
    kinds = [type(m) for m in model.head]
    assert kinds == [nn.AdaptiveAvgPool2d, nn.Flatten, L2Linear, nn.ReLU, nn.BatchNorm1d, nn.Dropout, nn.Linear]
    dense = model.head[2]
    assert dense.out_features == 1024 and model.head[5].p == 0.5
    penalty = model.l2_penalty()
    assert torch.allclose(penalty, 0.01 * dense.weight.pow(2).sum())
    penalty.backward()
    assert torch.allclose(dense.weight.grad, 0.02 * dense.weight)
    assert create_model("cnn1", num_classes=2).l2_penalty().item() == 0.0


def _trainable(module: nn.Module) -> set[bool]:
    return {p.requires_grad for p in module.parameters()}


def test_head_only_freezes_the_backbone_and_its_batchnorm_statistics():
    model = create_model("cnn2", num_classes=2)
    count = set_trainable(model, "head")
    assert _trainable(model.backbone) == {False} and _trainable(model.head) == {True}
    assert count == sum(p.numel() for p in model.head.parameters())
    model.train()
    norms = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    frozen_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 0, 1])).backward()
    optimizer.step()
    for key, value in model.backbone.state_dict().items():  # weights and running statistics untouched
        assert torch.equal(value, frozen_before[key]), key
    set_trainable(model, "all")
    model.train()
    assert all(m.training for m in norms) and _trainable(model) == {True}


def test_last_n_unfreezes_exactly_the_last_n_parameter_layers():
    model = create_model("cnn3", num_classes=2)
    layers = parameter_layers(model.backbone)
    set_trainable(model, "last:3")
    flags = [_trainable(layer) for _, layer in layers]
    assert flags == [{False}] * (len(layers) - 3) + [{True}] * 3
    assert _trainable(model.head) == {True}
    model.train()  # the last block's two BatchNorms are among the last 3 layers: only they train
    norms = [layer for _, layer in layers if isinstance(layer, nn.BatchNorm2d)]
    assert [m.training for m in norms] == [False] * (len(norms) - 2) + [True] * 2
    with pytest.warns(UserWarning, match="only"):
        set_trainable(model, f"last:{len(layers) + 5}")
    assert _trainable(model) == {True}
    with pytest.raises(ValueError, match="'all', 'head' or 'last:N'"):
        set_trainable(model, "last:ten")


def test_keras_last_150_layers_of_resnet101v2_is_last_81_here():
    """Keras counts parameter-free layers too; its 150th-from-last layer of ResNet101V2 is
    conv4_block13_3_conv, i.e. stage 3 (index 2), block 13 (index 12), third convolution."""
    model = create_model("resnet101", num_classes=2)
    layers = parameter_layers(model.backbone)
    assert len(layers) == 204  # 104 convolutions + 100 BatchNorms, as in Keras ResNet101V2
    set_trainable(model, "last:81")
    trainable = [name for name, layer in layers if _trainable(layer) == {True}]
    assert trainable[0] == "stages.2.blocks.12.conv3" and len(trainable) == 81


def test_flatten_head_takes_its_input_size_from_the_config():
    from covidscan.config import ConfigError, config_from_dict
    from covidscan.models import create_model_from_config

    raw = {"data": {"image_size": 48, "channels": 1}, "model": {"name": "cnn1", "kwargs": {"pooling": "flatten"}}}
    model = create_model_from_config(config_from_dict(raw), num_classes=2)
    assert next(m for m in model.head if isinstance(m, nn.Linear)).in_features == 128 * 6 * 6
    assert model(torch.randn(2, 1, 48, 48)).shape == (2, 2)
    with pytest.raises(ValueError, match=r"sized for a \(128, 6, 6\) feature map.*got \(128, 8, 8\).*image_size"):
        model(torch.randn(2, 1, 64, 64))  # not the bare "mat1 and mat2 shapes cannot be multiplied"
    with pytest.raises(ConfigError, match=r"model.kwargs.input_size \(64\) differs from data.image_size \(48\)"):
        config_from_dict(raw, ["model.kwargs.input_size=64"])
    assert config_from_dict(raw, ["model.kwargs.input_size=48"]).model.kwargs["input_size"] == 48  # agreeing: fine
