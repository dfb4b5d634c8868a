"""Permutation structure from the fx graph (vfnb.graph): invariance, group structure, errors."""
import pytest
import torch
import torchvision
from torch import nn
import torch.nn.functional as F

from vfnb.graph import (Entry, Permutation, UnsupportedOperationError, apply_permutation, identity_permutation,
                        permutation_spec, random_permutation)
from vfnb.models import build_model

MNIST, CIFAR = (1, 28, 28), (3, 32, 32)


class SharedConv(nn.Module):
    """One conv applied twice: its input and output channels must share one permutation."""

    def __init__(self):
        super().__init__()
        self.stem, self.mid, self.head = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 6, 3, padding=1), nn.Linear(6, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.mid(F.relu(self.mid(x))))
        return self.head(x.mean((2, 3)))


class ChannelsLast(nn.Module):
    """nn.LayerNorm over channels after a permute, a view into a linear layer (blocks of H*W)."""

    def __init__(self):
        super().__init__()
        self.conv, self.ln, self.conv2 = nn.Conv2d(3, 5, 3, stride=4), nn.LayerNorm(5), nn.Conv2d(5, 4, 1)
        self.fc, self.out = nn.Linear(4 * 9 * 9, 7), nn.Linear(7, 3)

    def forward(self, x):
        x = self.ln(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = F.max_pool2d(F.gelu(self.conv2(F.pad(x, (1, 1, 1, 1)))), 1)
        return self.out(torch.tanh(self.fc(x.reshape(x.size(0), -1))))


CASES = {
    "mlp-linear": lambda: (build_model("mlp", depth=8, width=16), MNIST),
    "mlp-relu": lambda: (build_model("mlp", depth=4, width=16, activation="relu"), MNIST),
    "mlp-residual": lambda: (build_model("mlp", depth=6, width=16, activation="relu", residual=True), MNIST),
    "vgg16-none": lambda: (build_model("vgg16", width=0.125), CIFAR),
    "vgg16-bn": lambda: (build_model("vgg16", norm="bn", width=0.125, in_channels=1, input_size=28), MNIST),
    "vgg16-ln": lambda: (build_model("vgg16", norm="ln", width=0.125), CIFAR),
    "resnet20-bn": lambda: (build_model("resnet20", norm="bn", width=0.5), CIFAR),
    "resnet20-ln": lambda: (build_model("resnet20", norm="ln", width=0.5, in_channels=1, input_size=28), MNIST),
    "resnet18": lambda: (torchvision.models.resnet18(weights=None, num_classes=10), CIFAR),
    "resnet50": lambda: (torchvision.models.resnet50(weights=None, num_classes=10), CIFAR),
    "shared-conv": lambda: (SharedConv(), (3, 12, 12)),
    "channels-last": lambda: (ChannelsLast(), (3, 29, 29)),
}


def warm(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Non-trivial norm parameters and BatchNorm running statistics (set directly: train-mode
    forwards of a random-init resnet50 are slow on CPU), then eval mode."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) or type(m).__name__ == "LayerNorm2d":
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("name", CASES)
def test_random_permutation_leaves_outputs_unchanged(name):
    torch.manual_seed(0)
    model, shape = CASES[name]()
    x = torch.randn(4, *shape)
    model = warm(model, x)
    spec = permutation_spec(model, x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    permuted = apply_permutation(model, random_permutation(spec, seed=1))
    with torch.no_grad():
        y, y_perm = model(x), permuted(x)
    assert (y - y_perm).abs().max() <= 1e-5 * y.abs().max()
    after = permuted.state_dict()
    assert any(not torch.equal(v, after[k]) for k, v in before.items())
    for k, v in model.state_dict().items():  # the input model is untouched
        assert torch.equal(v, before[k])
    # every hidden axis is permuted: no conv/linear/norm tensor is silently left out
    first, last = spec.layers[0], spec.layers[-1]
    for mod_name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            assert (spec.group_of(f"{mod_name}.weight", 0) is None) == (mod_name == last), mod_name
            assert (spec.group_of(f"{mod_name}.weight", 1) is None) == (mod_name == first), mod_name
        elif isinstance(mod, (nn.BatchNorm2d, nn.LayerNorm)) or type(mod).__name__ == "LayerNorm2d":
            assert spec.group_of(f"{mod_name}.weight") is not None, mod_name
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        assert any(e.key.endswith("running_var") for g in spec.groups for e in g.entries)
        assert not any(e.key.endswith("num_batches_tracked") for g in spec.groups for e in g.entries)


def test_group_structure_and_depths():
    vgg = permutation_spec(build_model("vgg16", width=0.125), torch.randn(2, *CIFAR))
    assert len(vgg.groups) == 13 and vgg.num_layers == 14
    assert [g.depth for g in vgg.groups] == list(range(1, 14))
    assert vgg.group_of("features.0.weight").index == 0 and vgg.group_of("features.0.weight", 1) is None
    assert vgg.group_of("classifier.weight", 0) is None
    assert vgg.group_of("classifier.weight", 1) is vgg.groups[-1]
    with pytest.raises(KeyError):
        vgg.group_of("nope.weight")

    res = permutation_spec(build_model("resnet20", width=0.25), torch.randn(2, *CIFAR))
    assert len(res.groups) == 12 and res.num_layers == 20
    streams = [g for g in res.groups if len(g.producers) > 1]
    assert len(streams) == 3  # one residual stream per stage, 9 block-internal groups
    assert streams[0].producers == ("conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2")
    assert streams[0].producer_depths == (1, 3, 5, 7) and streams[0].depth == 7
    assert "layer2.0.shortcut.0" in streams[1].producers  # shortcut convs join the stream ...
    assert streams[1].producer_depths[streams[1].producers.index("layer2.0.shortcut.0")] is None  # ... uncounted
    assert len(streams[0].captures) == 4  # stem ReLU + each block's final ReLU
    assert all(len(g.captures) == 1 for g in res.groups if len(g.producers) == 1)

    assert len(permutation_spec(build_model("mlp", depth=8, width=16), torch.randn(2, *MNIST)).groups) == 7
    resid = permutation_spec(build_model("mlp", depth=6, width=16, residual=True), torch.randn(2, *MNIST))
    assert len(resid.groups) == 1 and len(resid.groups[0].producers) == 5
    r50 = permutation_spec(torchvision.models.resnet50(weights=None), torch.randn(2, *CIFAR))
    assert r50.num_layers == 50 and len(r50.groups) == 37  # stem, 4 streams, 2 per bottleneck
    assert "PermutationSpec" in repr(vgg) and "features.0@1" in vgg.summary()


def test_flatten_maps_channels_to_blocks():
    spec = permutation_spec(ChannelsLast(), torch.randn(2, 3, 29, 29))
    assert Entry("fc.weight", 1, 81) in spec.group_of("conv2.weight").entries
    assert Entry("ln.weight", 0, 1) in spec.group_of("conv.weight").entries
    vgg = permutation_spec(build_model("vgg11", width=0.125, input_size=28, in_channels=1), torch.randn(1, *MNIST))
    assert Entry("classifier.weight", 1, 1) in vgg.groups[-1].entries  # 1x1 map at the end of VGG


def test_residual_with_the_input_keeps_identity():
    class AddInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.c(F.relu(self.b(F.relu(self.a(x) + x))))

    spec = permutation_spec(AddInput(), torch.randn(2, 3, 4, 4))
    assert [g.producers for g in spec.groups] == [("b",)]  # a's output is tied to the unpermuted input


class Cat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(torch.cat([self.a(x), self.b(x)], dim=1))


class Index(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Conv2d(3, 4, 3), nn.Conv2d(2, 2, 1)

    def forward(self, x):
        return self.head(self.a(x)[:, :2])


class Softmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.sm, self.head = nn.Linear(3, 4), nn.Softmax(dim=1), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.sm(self.a(x)))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)

    def forward(self, x):
        return self.a(x) if x.sum() > 0 else x


@pytest.mark.parametrize("model,x", [(Cat(), torch.randn(2, 3, 8, 8)), (Index(), torch.randn(2, 3, 8, 8)),
                                     (Softmax(), torch.randn(2, 3))])
def test_concatenation_slicing_and_softmax_keep_the_function(model, x):
    spec = permutation_spec(model, x)
    permuted = apply_permutation(model, random_permutation(spec, seed=1))
    with torch.no_grad():
        assert torch.allclose(model(x), permuted(x), atol=1e-6)
    assert spec.groups


def test_concatenation_joins_groups_at_offsets_and_slices_split_them():
    cat = permutation_spec(Cat(), torch.randn(2, 3, 8, 8))
    assert [g.producers for g in cat.groups] == [("a",), ("b",)]
    assert Entry("head.weight", 1, 1, (0, 1, 2, 3)) in cat.groups[0].entries
    assert Entry("head.weight", 1, 1, (4, 5, 6, 7)) in cat.groups[1].entries
    index = permutation_spec(Index(), torch.randn(2, 3, 8, 8))
    assert [g.size for g in index.groups] == [2, 2]  # the kept channels and the dropped ones, apart


def test_untraceable_model_is_refused():
    with pytest.raises(UnsupportedOperationError, match=r"cannot trace Branchy"):
        permutation_spec(Branchy(), torch.randn(2, 3))


def test_bad_inputs_get_clear_errors():
    vgg = build_model("vgg11", width=0.125)
    with pytest.raises(ValueError, match=r"example_input of shape \[2, 1, 28, 28\] does not fit VGG"):
        permutation_spec(vgg, torch.randn(2, 1, 28, 28))
    spec = permutation_spec(vgg, torch.randn(2, *CIFAR))
    perm = random_permutation(spec, 0)
    with pytest.raises(ValueError, match="belongs to another model"):
        apply_permutation(build_model("vgg11", width=0.25), perm)
    with pytest.raises(ValueError, match="belongs to another model"):
        apply_permutation(build_model("mlp"), perm)
    with pytest.raises(ValueError, match="permutation of range"):
        Permutation(spec, (torch.zeros(spec.groups[0].size, dtype=torch.long), *perm.perms[1:]))
    with pytest.raises(ValueError, match="groups"):
        Permutation(spec, perm.perms[:2])
    assert perm.inverse().inverse() == perm and perm != identity_permutation(spec)
    assert torch.equal(perm[0][perm.inverse()[0]], torch.arange(spec.groups[0].size))
    vgg.train()
    permutation_spec(vgg, torch.randn(1, *CIFAR))  # batch of one is fine; the mode is restored
    assert vgg.training


# ---------------------------------------------------------------------------------------------------
# Regressions from a hostile review of the label engine: each model once gave a silently wrong spec.
class _Two(nn.Module):
    def __init__(self, cin=3, c=4, out=2, fn=None, head_in=None):
        super().__init__()
        self.a, self.head, self.fn = nn.Conv2d(cin, c, 3, padding=1), nn.Conv2d(head_in or c, out, 1), fn
        self.alpha = nn.Parameter(torch.tensor(0.7))
        self.pos = nn.Parameter(torch.randn(1, 1, 5, 5))
        self.bound = nn.Parameter(torch.randn(1, c, 1, 1))
        self.gate = nn.Conv2d(c, 1, 3, padding=1)

    def forward(self, x):
        return self.head(self.fn(self, F.relu(self.a(x))))


def _roll_index(s, h):
    return torch.cat([h + h.roll(2, 1), h[:, [2, 1, 0, 3]]], 1)


HOSTILE = {
    "scalar gain on the right": dict(fn=lambda s, h: h + h * s.alpha),
    "spatial gate (CBAM)": dict(fn=lambda s, h: h * torch.sigmoid(s.gate(h))),
    "spatial bias": dict(fn=lambda s, h: h + s.pos),
    "clamp with a tensor bound": dict(fn=lambda s, h: torch.clamp(h, max=s.bound)),
    "maxout over channel pairs": dict(fn=lambda s, h: h.view(h.shape[0], 2, 2, 5, 5).amax(2), head_in=2),
    "mean of a stack": dict(fn=lambda s, h: torch.stack([h, h * 2]).mean(0)),
    "tied units reordered (roll, fancy index)": dict(fn=_roll_index, head_in=8),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_models_keep_the_function(name):
    torch.manual_seed(0)
    model = _Two(**HOSTILE[name]).double().eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    spec = permutation_spec(model, x)
    assert spec.group_of("a.weight") is not None and spec.group_of("a.weight").size > 1  # not vacuous
    moved = False
    for seed in range(6):
        permuted = apply_permutation(model, random_permutation(spec, seed=seed))
        moved |= not torch.equal(permuted.a.weight, model.a.weight)
        with torch.no_grad():
            assert (model(x) - permuted(x)).abs().max() <= 1e-9 * model(x).abs().max(), seed
    assert moved


def test_outer_products_and_parametrized_weights_are_refused():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(3, 4), nn.Linear(3, 5), nn.Linear(20, 2)

        def forward(self, x):
            return self.head((self.a(x)[:, :, None] * self.b(x)[:, None, :]).flatten(1))

    with pytest.raises(UnsupportedOperationError, match="outer product"):
        permutation_spec(Outer(), torch.randn(2, 3))
    normed = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(3, 4)), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(UnsupportedOperationError, match="parametrized weight"):
        permutation_spec(normed, torch.randn(2, 3))


def test_an_embedding_tied_to_the_output_layer_stays_fixed():
    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.mid = nn.Embedding(7, 4), nn.Linear(4, 4)

        def forward(self, idx):
            return F.linear(torch.tanh(self.mid(self.emb(idx))), self.emb.weight)

    model = TiedLM().double().eval()
    idx = torch.randint(0, 7, (2, 3))
    spec = permutation_spec(model, idx)
    permuted = apply_permutation(model, random_permutation(spec, seed=1))
    with torch.no_grad():
        assert torch.allclose(model(idx), permuted(idx), atol=1e-12)


def test_padding_modules_keep_the_units():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.ZeroPad2d(1), nn.ReflectionPad2d(1),
                          nn.Conv2d(4, 2, 3)).double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    spec = permutation_spec(model, x)
    assert [g.size for g in spec.groups] == [4]
    permuted = apply_permutation(model, random_permutation(spec, seed=1))
    with torch.no_grad():
        assert torch.allclose(model(x), permuted(x), atol=1e-12)
