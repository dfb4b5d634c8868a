import pytest
import torch

from vfnb import build_model
from vfnb.models import LayerNorm2d, MODELS


@pytest.mark.parametrize("name", [m for m in MODELS if m.startswith("vgg")])
@pytest.mark.parametrize("norm", ["none", "bn", "ln"])
def test_vgg_shapes_and_layer_count(name, norm):
    m = build_model(name, in_channels=1, num_classes=10, norm=norm, width=0.125, input_size=28)
    out = m(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10)
    convs = [x for x in m.modules() if isinstance(x, torch.nn.Conv2d)]
    expected = {"vgg11": 8, "vgg13": 10, "vgg16": 13, "vgg19": 16}[name]
    assert len(convs) == expected  # plus one linear classifier: VGG16 has L = 14


def test_vgg16_single_classifier_and_stable_names():
    m = build_model("vgg16", norm="bn", width=0.25)
    names = [n for n, _ in m.named_parameters()]
    assert names[0] == "features.0.weight" and names[-1] == "classifier.bias"
    assert sum(isinstance(x, torch.nn.Linear) for x in m.modules()) == 1
    # same arguments -> same parameter names (checkpoints depend on it)
    assert names == [n for n, _ in build_model("vgg16", norm="bn", width=0.25).named_parameters()]


@pytest.mark.parametrize("norm", ["bn", "ln"])
def test_resnet20_has_twenty_layers(norm):
    m = build_model("resnet20", norm=norm, width=0.5, num_classes=100)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    layers = [n for n, x in m.named_modules() if isinstance(x, (torch.nn.Conv2d, torch.nn.Linear))
              and "shortcut" not in n]
    assert len(layers) == 20


def test_mlp_linear_is_affine_and_residual():
    m = build_model("mlp", in_features=6, num_classes=3, depth=4, width=5, activation="none")
    x, y = torch.randn(7, 6), torch.randn(7, 6)
    # a linear network is affine: f(x) + f(y) - f(0) == f(x + y)
    zero = m(torch.zeros(1, 6))
    torch.testing.assert_close(m(x) + m(y) - zero, m(x + y), atol=1e-5, rtol=1e-5)
    r = build_model("mlp", in_features=6, num_classes=3, depth=4, width=5, residual=True)
    assert r.skip == [False, True, True, False]
    with torch.no_grad():
        for layer in r.layers[1:3]:
            layer.weight.zero_(); layer.bias.zero_()
    # zeroed residual layers are identities: the net reduces to first and last layer
    expect = r.layers[3](r.layers[0](x))
    torch.testing.assert_close(r(x), expect)


def test_layernorm2d_normalizes_over_channels():
    ln = LayerNorm2d(4)
    x = torch.randn(2, 4, 3, 3) * 5 + 2
    y = ln(x)
    torch.testing.assert_close(y.mean(1), torch.zeros(2, 3, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(1, unbiased=False), torch.ones(2, 3, 3), atol=1e-3, rtol=0)


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="unknown model 'vgg17'.*vgg16"):
        build_model("vgg17")
    with pytest.raises(TypeError, match="unknown argument.*depht"):
        build_model("mlp", depht=3)
    with pytest.raises(ValueError, match="norm"):
        build_model("vgg16", norm="gn")
    with pytest.raises(ValueError, match="activation"):
        build_model("mlp", activation="tanh")
