"""The alignment engine on modern architectures (issue 13): depthwise and grouped convs, squeeze-
excitation, concatenation, channel shuffle, stochastic depth, attention (torchvision's and a hand-
written one), shifted windows, token mixing. Every family, with random weights:

- a random permutation leaves the function unchanged;
- weight matching recovers a permuted copy exactly, and activation matching too (dead units are
  matched by weight similarity);
- match → interpolate → RESET (or REPAIR) runs and gives finite outputs;
- preserve-first merging at l = 0 is the plain merge and at l = L the ensemble;
- pruning and post-pruning repair run.
"""
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.convnext import CNBlockConfig
from torchvision.ops import Conv2dNormActivation

from vfnb.graph import UnsupportedOperationError, apply_permutation, permutation_spec, random_permutation
from vfnb.matching import activation_matching, weight_matching
from vfnb.merge import interpolate
from vfnb.normalize import repair, reset_bn_stats
from vfnb.pfm import preserve_first
from vfnb.pruning import prune, repair_pruned


class HandAttention(nn.Module):
    """A ViT block written by hand: one qkv projection, heads by reshape, matmul, softmax, class token
    and positional embedding, a GELU MLP, pre-norm residuals."""

    def __init__(self, dim: int = 16, heads: int = 4, tokens: int = 16, classes: int = 5) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim))
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        b, n, d = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5).softmax(dim=-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return self.head(x[:, 0])


class Mixer(nn.Module):
    """MLP-Mixer: a Linear on the token axis (token mixing) and one on the channel axis."""

    def __init__(self, dim: int = 12, tokens: int = 16, classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.norm1, self.tok1, self.tok2 = nn.LayerNorm(dim), nn.Linear(tokens, 24), nn.Linear(24, tokens)
        self.norm2, self.ch1, self.ch2 = nn.LayerNorm(dim), nn.Linear(dim, 20), nn.Linear(20, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        y = self.norm1(x).transpose(1, 2)
        x = x + self.tok2(F.gelu(self.tok1(y))).transpose(1, 2)
        x = x + self.ch2(F.gelu(self.ch1(self.norm2(x))))
        return self.head(x.mean(1))


def _vit():
    return torchvision.models.VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2,
                                               hidden_dim=16, mlp_dim=24, num_classes=5)


def _swin():
    return torchvision.models.SwinTransformer(patch_size=[2, 2], embed_dim=8, depths=[1, 1], num_heads=[2, 2],
                                              window_size=[2, 2], stochastic_depth_prob=0.1, num_classes=5)


def _mobilenet_v2():
    m = torchvision.models.MobileNetV2(num_classes=5, width_mult=0.5,
                                       inverted_residual_setting=[[1, 8, 1, 1], [6, 16, 2, 2], [6, 24, 1, 2]])
    m.features[-1] = Conv2dNormActivation(16, 32, kernel_size=1, activation_layer=nn.ReLU6)
    m.classifier[1] = nn.Linear(32, 5)
    return m


def _mobilenet_v3():
    from torchvision.models.mobilenetv3 import InvertedResidualConfig as C
    setting = [C(8, 3, 8, 8, True, "RE", 2, 1, 1.0), C(8, 3, 24, 16, False, "RE", 2, 1, 1.0),
               C(16, 5, 32, 16, True, "HS", 1, 1, 1.0), C(16, 3, 48, 24, True, "HS", 2, 1, 1.0)]
    return torchvision.models.MobileNetV3(setting, last_channel=32, num_classes=5)


def _resnext():
    """A small ResNeXt: torchvision's bottleneck blocks with 4 groups of 4 channels."""
    from torchvision.models.resnet import Bottleneck
    down = nn.Sequential(nn.Conv2d(16, 32, 1, 2, bias=False), nn.BatchNorm2d(32))
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         Bottleneck(16, 8, 2, down, groups=4, base_width=32), Bottleneck(32, 8, groups=4, base_width=32),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5))


FAMILIES = {
    "depthwise+SE (MobileNetV3)": _mobilenet_v3,
    "depthwise (MobileNetV2)": _mobilenet_v2,
    "grouped (ResNeXt)": _resnext,
    "concatenation (DenseNet)": lambda: torchvision.models.DenseNet(growth_rate=4, block_config=(2, 2),
                                                                    num_init_features=8, bn_size=2, num_classes=5),
    "channel shuffle (ShuffleNetV2)": lambda: torchvision.models.ShuffleNetV2([1, 1, 1], [8, 8, 16, 32, 32],
                                                                              num_classes=5),
    "stochastic depth + layer scale (ConvNeXt)": lambda: torchvision.models.ConvNeXt(
        [CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], stochastic_depth_prob=0.2, num_classes=5),
    "attention (ViT)": _vit,
    "attention (ViT, 4 patches)": lambda: torchvision.models.VisionTransformer(
        image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=8, num_classes=5),
    "attention by hand": HandAttention,
    "shifted windows (Swin)": _swin,
    "token mixing (MLP-Mixer)": Mixer,
}


def _randomized(model: nn.Module) -> nn.Module:
    """Random weights everywhere (torchvision zero-initializes some heads and layer scales), non-trivial
    BatchNorm statistics, float64, eval mode."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if bool((p == p.flatten()[0]).all()):  # zeros, ones, constant layer scales
                p.add_(torch.randn_like(p) * 0.2)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0)
    return model.double().eval()


SMALL_INPUT = {"attention (ViT)", "attention (ViT, 4 patches)", "attention by hand", "shifted windows (Swin)", "token mixing (MLP-Mixer)"}


def _pair(name):
    a = _randomized(FAMILIES[name]())
    torch.manual_seed(1)
    size = 16 if name in SMALL_INPUT else 32
    return a, torch.randn(8, 3, size, size, dtype=torch.float64)


def _same_state(m1: nn.Module, m2: nn.Module) -> bool:
    s2 = m2.state_dict()
    return all(torch.equal(v, s2[k]) for k, v in m1.state_dict().items())


@pytest.mark.parametrize("name", FAMILIES)
def test_permutation_invariance_and_recovery(name):
    a, x = _pair(name)
    spec = permutation_spec(a, x)
    assert any(g.size > 1 for g in spec.groups)
    b = apply_permutation(a, random_permutation(spec, seed=3))
    assert not _same_state(a, b)
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert (ya - yb).abs().max() <= 1e-5 * ya.abs().max()
    wm = weight_matching(a, b, x, seed=0)
    assert _same_state(apply_permutation(b, wm), a), "weight matching did not recover the permuted copy"
    am = activation_matching(a, b, x, example_input=x, batch_size=4)
    assert _same_state(apply_permutation(b, am), a), "activation matching did not recover the permuted copy"


@pytest.mark.parametrize("name", FAMILIES)
def test_merge_normalize_pfm_and_prune_run(name):
    a, x = _pair(name)
    torch.manual_seed(2)
    b = _randomized(FAMILIES[name]())
    perm = weight_matching(a, b, x, seed=0, orders=1)
    merged = interpolate(a, apply_permutation(b, perm), 0.5)
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in a.modules())
    fixed = reset_bn_stats(merged, x) if has_bn else merged
    with torch.no_grad():
        assert torch.isfinite(fixed(x)).all()
    pfm0 = preserve_first(a, b, perm, 0, 0.5, example_input=x)
    spec = perm.spec
    pfmL = preserve_first(a, b, perm, spec.num_layers, 0.5, example_input=x)
    with torch.no_grad():
        assert torch.allclose(pfm0(x), merged(x), atol=1e-9)
        assert torch.allclose(pfmL(x), 0.5 * a(x) + 0.5 * b(x), atol=1e-9)
    pruned, _ = prune(a, 0.5)
    repaired = repair_pruned(pruned, a, x, method="reset" if has_bn else "rescale")
    with torch.no_grad():
        assert torch.isfinite(repaired(x)).all()


def test_repair_runs_on_a_transformer():
    a, x = _pair("attention by hand")
    torch.manual_seed(2)
    b = _randomized(HandAttention())
    perm = weight_matching(a, b, x, seed=0, orders=1)
    merged = interpolate(a, apply_permutation(b, perm), 0.5)
    out = repair(merged, [a, apply_permutation(b, perm)], [0.5, 0.5], x)
    with torch.no_grad():
        assert torch.isfinite(out(x)).all()


class Argmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(3, 4), nn.Linear(1, 2)

    def forward(self, x):
        return self.head(self.a(x).argmax(1, keepdim=True).to(x.dtype))


class Sort(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.sort(self.a(x), dim=1).values)


class Einsum3(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        y = self.a(x)
        return self.head(torch.einsum("bi,bi,bi->bi", y, y, y))


@pytest.mark.parametrize("model,match", [
    (Argmax(), r"fx node 'argmax'.*acts on permuted units \(method argmax\)"),
    (Sort(), r"fx node 'sort'.*function sort"),
    (Einsum3(), r"einsum vfnb cannot map"),
])
def test_unsupported_operations_name_the_operation(model, match):
    with pytest.raises(UnsupportedOperationError, match=match):
        permutation_spec(model, torch.randn(2, 3))


def test_the_architectures_page_examples_run():
    """book/architectures.md: its examples run as written and its census line is filled in."""
    import re
    from conftest import ROOT
    text = (ROOT / "book" / "architectures.md").read_text()
    assert "CENSUS_RESULT" not in text
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 4
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "architectures.md", "exec"), namespace)  # noqa: S102 - our own documentation
    assert [g.size for g in namespace["spec"].groups][:1] == [48]
