"""Tests for the model registry and architectures (source/models)."""

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_diabetes, load_digits
from torch import nn

from source.errors import UserError
from source.models import available_models, build_model
from source.models.mobilenet_v2_cifar import MobileNetV2Cifar
from source.models.resnet_cifar import ResNetCifar, ZeroPadShortcut

CIFAR_STYLE = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "mobilenet_v2_cifar", "densenet40",
               "densenet_bc_100"]
IMAGENET = ["resnet18", "resnet34", "resnet50", "mobilenet_v2", "densenet121"]

# A typical input for each model: (num_classes, input_shape). ImageNet nets get 64 pixels to stay fast.
EXAMPLE_INPUTS = {
    **{name: (10, (3, 32, 32)) for name in CIFAR_STYLE},
    "small_cnn": (10, (1, 8, 8)),
    "mlp": (1, (10,)),
    **{name: (7, (3, 64, 64)) for name in IMAGENET},
}

# Exact counts for 10 classes on 3-channel input, and the published figure (He et al. 2016 Table 6;
# Huang et al. 2017 Table 2).
PARAMETER_COUNTS = {
    "resnet20": (269_722, 0.27e6),
    "resnet32": (464_154, 0.46e6),
    "resnet44": (658_586, 0.66e6),
    "resnet56": (853_018, 0.85e6),
    "resnet110": (1_727_962, 1.7e6),
    "densenet40": (1_019_722, 1.0e6),
}

# torchvision's published counts for the 1000-class ImageNet models.
IMAGENET_PARAMETER_COUNTS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "mobilenet_v2": 3_504_872,
    "densenet121": 7_978_856,
}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Run this module's tiny batches on one thread: a second thread gains nothing on them, and
    spin-waiting threads slow down many-fold when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def test_available_models_lists_every_name_sorted():
    assert available_models() == sorted(CIFAR_STYLE + IMAGENET + ["small_cnn", "mlp"])


@pytest.mark.parametrize("name", sorted(EXAMPLE_INPUTS))
def test_forward_and_backward_reach_every_parameter(name):
    torch.manual_seed(0)
    num_classes, input_shape = EXAMPLE_INPUTS[name]
    model = build_model(name, num_classes, input_shape)
    inputs = torch.randn(2, *input_shape)

    outputs = model(inputs)
    outputs.square().sum().backward()

    assert outputs.shape == (2, num_classes)
    for parameter_name, parameter in model.named_parameters():
        assert parameter.grad is not None, parameter_name
        assert torch.isfinite(parameter.grad).all(), parameter_name
        assert parameter.grad.abs().sum() > 0, parameter_name


@pytest.mark.parametrize("name", sorted(PARAMETER_COUNTS))
def test_parameter_count_matches_published_figure(name):
    exact, published = PARAMETER_COUNTS[name]
    count = count_parameters(build_model(name, 10, (3, 32, 32)))
    assert count == exact
    assert abs(count - published) <= 0.02 * published


def test_densenet_bc_100_parameter_count_matches_published_figure():
    # The paper gives one rounded figure, 0.8 M, for its CIFAR-10 and CIFAR-100 columns; the
    # architecture has 0.77 M parameters with 10 classes and 0.80 M with 100.
    assert count_parameters(build_model("densenet_bc_100", 10, (3, 32, 32))) == 769_162
    count_for_100_classes = count_parameters(build_model("densenet_bc_100", 100, (3, 32, 32)))
    assert count_for_100_classes == 800_032
    assert abs(count_for_100_classes - 0.8e6) <= 0.02 * 0.8e6


def test_mobilenet_v2_cifar_has_the_imagenet_parameter_count_and_ends_on_4x4_maps():
    cifar_model = MobileNetV2Cifar(num_classes=10)
    imagenet_model = build_model("mobilenet_v2", 10, (3, 224, 224))
    assert count_parameters(cifar_model) == count_parameters(imagenet_model) == 2_236_682
    last_feature_map = cifar_model.features[:-2](torch.zeros(1, 3, 32, 32))
    assert last_feature_map.shape == (1, 320, 4, 4)


@pytest.mark.parametrize(("name", "depth"), [("resnet20", 20), ("resnet56", 56), ("resnet110", 110),
                                             ("densenet40", 40), ("densenet_bc_100", 100)])
def test_depth_counts_weighted_layers(name, depth):
    model = build_model(name, 10, (3, 32, 32))
    weighted_layers = [module for module in model.modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
    assert len(weighted_layers) == depth


def test_option_a_shortcut_subsamples_and_pads_with_zero_channels():
    inputs = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    outputs = ZeroPadShortcut(added_channels=2, stride=2)(inputs)
    assert outputs.shape == (2, 5, 2, 2)
    assert torch.equal(outputs[:, :3], inputs[:, :, ::2, ::2])
    assert torch.count_nonzero(outputs[:, 3:]) == 0


def test_cifar_resnet_rejects_depth_not_of_form_6n_plus_2():
    with pytest.raises(ValueError, match="6n \\+ 2"):
        ResNetCifar(depth=21, num_classes=10)


@pytest.mark.parametrize("name", CIFAR_STYLE + ["small_cnn"])
def test_input_channels_come_from_input_shape(name):
    model = build_model(name, 5, (1, 16, 16))
    first_convolution = next(module for module in model.modules() if isinstance(module, nn.Conv2d))
    assert first_convolution.in_channels == 1
    assert model.eval()(torch.zeros(1, 1, 16, 16)).shape == (1, 5)


@pytest.mark.parametrize(("name", "input_shape"), [
    ("resnet20", (3, 8, 8)),
    ("resnet20", (3, 64, 64)),
    ("mobilenet_v2_cifar", (3, 8, 8)),
    ("densenet40", (3, 9, 13)),
    ("small_cnn", (3, 4, 4)),
    ("small_cnn", (2, 28, 28)),
    ("mlp", (1, 8, 8)),
    ("resnet18", (3, 32, 32)),
])
def test_models_take_inputs_at_their_size_limits(name, input_shape):
    model = build_model(name, 3, input_shape).eval()
    assert model(torch.zeros(2, *input_shape)).shape == (2, 3)


@pytest.mark.parametrize(("name", "input_shape", "expected_message"), [
    ("resnet20", (3, 224, 224),
     "Model 'resnet20' takes images of 8 to 64 pixels a side, not 224x224; models that fit input shape "
     "(3, 224, 224): densenet121, mobilenet_v2, resnet18, resnet34, resnet50."),
    ("densenet40", (3, 4, 4), "Model 'densenet40' takes images of 8 to 64 pixels a side, not 4x4; models that "
     "fit input shape (3, 4, 4): mlp, small_cnn."),
    ("resnet20", (10,), "Model 'resnet20' takes images of 8 to 64 pixels a side with any number of channels, not "
     "input of shape (10,); models that fit input shape (10,): mlp."),
    ("small_cnn", (10,), "models that fit input shape (10,): mlp."),
    ("resnet50", (10,), "models that fit input shape (10,): mlp."),
    ("resnet18", (1, 64, 64), "Model 'resnet18' takes images with 3 channels, not 1;"),
    ("resnet18", (3, 16, 16), "Model 'resnet18' takes images of 32 to 1024 pixels a side, not 16x16;"),
    ("mlp", (3, 224, 224), "Model 'mlp' takes images of at most 4096 values (flattened), not 150528;"),
])
def test_model_refuses_input_it_cannot_take(name, input_shape, expected_message):
    with pytest.raises(UserError) as raised:
        build_model(name, 10, input_shape)
    assert expected_message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_unknown_name_lists_valid_names_and_suggests_the_closest():
    with pytest.raises(UserError) as raised:
        build_model("resnet_20", 10, (3, 32, 32))
    message = str(raised.value)
    assert message.startswith("Unknown model 'resnet_20' (did you mean 'resnet20'?); valid names: densenet121, ")
    assert all(name in message for name in available_models())


def test_unknown_name_without_close_match_has_no_suggestion():
    with pytest.raises(UserError, match="^Unknown model 'transformer'; valid names: densenet121, "):
        build_model("transformer", 10, (3, 32, 32))


@pytest.mark.parametrize(("num_classes", "input_shape", "expected_message"), [
    (0, (10,), "num_classes must be a positive integer, got 0."),
    (2.5, (10,), "num_classes must be a positive integer, got 2.5."),
    (True, (10,), "num_classes must be a positive integer, got True."),
    (1, (10, 3), "input_shape must be (channels, height, width) or (features,)"),
    (1, (3, 0, 32), "input_shape must be (channels, height, width) or (features,)"),
    (1, "10", "input_shape must be (channels, height, width) or (features,)"),
])
def test_bad_class_count_or_shape_is_refused(num_classes, input_shape, expected_message):
    with pytest.raises(UserError) as raised:
        build_model("mlp", num_classes, input_shape)
    assert expected_message in str(raised.value)


def test_input_shape_accepts_torch_size():
    model = build_model("small_cnn", 10, torch.Size([1, 8, 8]))
    assert model.eval()(torch.zeros(1, 1, 8, 8)).shape == (1, 10)


def test_imagenet_models_are_torchvision_architectures_built_without_downloading(monkeypatch):
    def refuse_download(*arguments, **keywords):
        raise AssertionError("a model tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse_download)
    for name, published_count in IMAGENET_PARAMETER_COUNTS.items():
        assert count_parameters(build_model(name, 1000, (3, 224, 224))) == published_count


def test_same_seed_builds_identical_weights():
    torch.manual_seed(3)
    first = build_model("resnet20", 10, (3, 32, 32)).state_dict()
    torch.manual_seed(3)
    second = build_model("resnet20", 10, (3, 32, 32)).state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_small_cnn_learns_digits_to_95_percent_test_accuracy_in_a_few_epochs():
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(labels), generator=generator)
    train_indices, test_indices = order[:1400], order[1400:]
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, (1, 8, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    for _ in range(5):
        model.train()
        shuffled = train_indices[torch.randperm(len(train_indices), generator=generator)]
        for batch in shuffled.split(64):
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    model.eval()
    with torch.no_grad():
        accuracy = (model(images[test_indices]).argmax(dim=1) == labels[test_indices]).float().mean()
    assert accuracy >= 0.95


def test_mlp_fits_diabetes_about_as_well_as_linear_regression():
    features, targets = load_diabetes(return_X_y=True)
    features = torch.tensor(features, dtype=torch.float32)
    targets = torch.tensor(targets, dtype=torch.float32).unsqueeze(1)
    features = (features - features.mean(0)) / features.std(0)
    targets = (targets - targets.mean()) / targets.std()
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(0))
    train_indices, test_indices = order[:350], order[350:]
    torch.manual_seed(0)
    model = build_model("mlp", 1, (10,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    for _ in range(60):
        loss = F.mse_loss(model(features[train_indices]), targets[train_indices])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    with torch.no_grad():
        mlp_error = F.mse_loss(model(features[test_indices]), targets[test_indices])
    with_intercept = torch.cat([features, torch.ones(len(features), 1)], dim=1)
    least_squares = torch.linalg.lstsq(with_intercept[train_indices], targets[train_indices]).solution
    least_squares_error = F.mse_loss(with_intercept[test_indices] @ least_squares, targets[test_indices])
    # On this split least squares explains 0.58 of the test variance, predicting the mean 0.
    variance = targets[test_indices].var()
    assert 1 - mlp_error / variance >= 1 - least_squares_error / variance - 0.1
