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


# ----- the torchvision-based entries (issue 13) -----------------------------------------------------------
MODERN = ("vit", "convnext", "mobilenet")


def test_modern_models_are_registered():
    assert set(MODERN) <= set(MODELS)


@pytest.mark.parametrize("name", MODERN)
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_modern_shapes(name, channels, size):
    m = build_model(name, in_channels=channels, num_classes=7, input_size=size).eval()
    with torch.no_grad():
        out = m(torch.randn(3, channels, size, size))
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all() and out.abs().max() > 0  # no zero-initialized head: f is not constant


@pytest.mark.parametrize("name", MODERN)
def test_modern_width_scales_parameters(name):
    # the recipe profiles' widths (smoke 0.125, cpu 0.25) build and are smaller than the default
    counts = []
    for width in (0.125, 0.25, 1.0):
        m = build_model(name, width=width, in_channels=1, input_size=28).eval()
        assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
        counts.append(sum(p.numel() for p in m.parameters()))
    assert counts[0] < counts[1] < counts[2]
    with pytest.raises(ValueError, match="width"):
        build_model(name, width=0)


@pytest.mark.parametrize("name", MODERN)
def test_modern_bad_arguments(name):
    with pytest.raises(TypeError, match=rf"{name}: unknown argument.*norm.*allowed: in_channels"):
        build_model(name, norm="bn")


@pytest.mark.parametrize("name", MODERN)
def test_modern_deterministic_given_seed(name):
    x = torch.randn(2, 3, 32, 32)

    def make(seed):
        torch.manual_seed(seed)
        return build_model(name, width=0.25).eval()

    a, b, c = make(0), make(0), make(1)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
        assert not torch.allclose(a(x), c(x))


@pytest.mark.parametrize("name", MODERN)
def test_modern_models_trace_with_fx(name):
    from vfnb.structure import trace

    m = build_model(name, width=0.25, in_channels=1, input_size=28).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        expect = m(x)
        torch.testing.assert_close(torch.fx.symbolic_trace(m)(x), expect, rtol=0, atol=0)
        torch.testing.assert_close(trace(m)(x), expect, rtol=0, atol=0)  # vfnb's tracer (the engine's)


def test_modern_state_dict_names_are_torchvision():
    from torchvision.models import ConvNeXt, MobileNetV2, VisionTransformer
    from torchvision.models.convnext import CNBlockConfig

    from vfnb.models.convnext import DIMS, DEPTHS
    from vfnb.models.mobilenet import SETTING

    tv = {
        "vit": VisionTransformer(32, 4, 6, 3, 96, 192, num_classes=10),
        "convnext": ConvNeXt([CNBlockConfig(d, DIMS[i + 1] if i + 1 < len(DIMS) else None, n)
                              for i, (d, n) in enumerate(zip(DIMS, DEPTHS))], num_classes=10),
        "mobilenet": MobileNetV2(10, 0.5, SETTING),
    }
    for name, ref in tv.items():
        ours = build_model(name).state_dict()
        theirs = ref.state_dict()
        assert list(ours) == list(theirs), name
        # same shapes except the stem, which takes in_channels and (convnext) a 2x2 patch
        differ = [k for k in ours if ours[k].shape != theirs[k].shape]
        assert differ in ([], ["features.0.0.weight"]), (name, differ)


def test_vit_pads_to_a_multiple_of_the_patch():
    m = build_model("vit", width=0.125, input_size=30, patch_size=4, in_channels=1).eval()
    assert m.image_size == 32 and m.pad == (1, 1, 1, 1)
    assert m(torch.randn(2, 1, 30, 30)).shape == (2, 10)
    m = build_model("vit", width=0.125, input_size=28, patch_size=4, in_channels=1)
    assert m.image_size == 28 and m.seq_length == 7 * 7 + 1 and not any(m.pad)
