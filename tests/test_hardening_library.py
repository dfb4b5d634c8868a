"""Hardening of the public library API (redesign issue, items 1, 2 and 11): non-finite weights are
refused everywhere, float64 models work end to end, and tied weights keep the function under a
permutation. Each test failed before its fix."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import vfnb
from vfnb.data import VisionData

MNIST = dict(in_channels=1, input_size=28)


def data(n: int = 24, seed: int = 0) -> VisionData:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    return VisionData("mnist5k", images, torch.arange(n) % 10, (0.1307,), (0.3081,), 10)


def vgg(seed: int, norm: str = "none") -> nn.Module:
    torch.manual_seed(seed)
    model = vfnb.build_model("vgg11", norm=norm, width=0.0625, **MNIST).eval()
    with torch.no_grad():  # live units
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.uniform_(0.0, 0.2)
    return model


def poisoned(model: nn.Module) -> nn.Module:
    bad = copy.deepcopy(model)
    with torch.no_grad():
        next(m for m in bad.modules() if isinstance(m, nn.Conv2d)).weight.view(-1)[3] = float("nan")
    return bad


# --------------------------------------------------------------------------- 1. NaN / inf weights
@pytest.mark.parametrize("call", ["interpolate", "calibrate_bias", "repair", "rescale", "reset", "prune",
                                  "repair_pruned", "preserve_first", "partial_zip", "feature_bias", "evaluate"])
def test_non_finite_weights_are_refused(call: str) -> None:
    a, b, d = vgg(0), vgg(1), data()
    nan = poisoned(b)
    x = d.tensors()[0][:1]
    perm = vfnb.identity_permutation(vfnb.permutation_spec(a, x))
    calls = {
        "interpolate": lambda: vfnb.interpolate(a, nan, 0.5),
        "calibrate_bias": lambda: vfnb.calibrate_bias(nan, b, 0.5),
        "repair": lambda: vfnb.repair(nan, [a, b], [0.5, 0.5], d),
        "rescale": lambda: vfnb.rescale(a, [a, nan], [0.5, 0.5], d),
        "reset": lambda: vfnb.reset_bn_stats(poisoned(vgg(0, "bn")), d),
        "prune": lambda: vfnb.prune(nan, 0.5),
        "repair_pruned": lambda: vfnb.repair_pruned(nan, a, d),
        "preserve_first": lambda: vfnb.preserve_first(a, nan, perm, 3),
        "partial_zip": lambda: vfnb.partial_zip(nan, b, perm, 3),
        "feature_bias": lambda: vfnb.feature_bias(nan, d),
        "evaluate": lambda: vfnb.evaluate(nan, d),
    }
    with pytest.raises(ValueError, match="non-finite"):
        calls[call]()


def test_inf_in_a_buffer_is_refused_too() -> None:
    a = vgg(0, "bn")
    bad = copy.deepcopy(a)
    next(m for m in bad.modules() if isinstance(m, nn.BatchNorm2d)).running_var[0] = float("inf")
    with pytest.raises(ValueError, match="non-finite values in 'features.1.running_var'"):
        vfnb.interpolate(a, bad, 0.5)


# --------------------------------------------------------------------------- 2. float64 end to end
def test_float64_models_work_end_to_end_and_agree_with_float32() -> None:
    d = data(32)
    a32, b32 = vgg(0), vgg(1)
    a64, b64 = copy.deepcopy(a32).double(), copy.deepcopy(b32).double()
    x = d.tensors()[0][:1]
    # evaluate and the diagnostics
    assert vfnb.evaluate(a64, d)["accuracy"] == vfnb.evaluate(a32, d)["accuracy"]
    fb64, fb32 = vfnb.feature_bias(a64, d), vfnb.feature_bias(a32, d)
    assert torch.allclose(torch.tensor(fb64.g_mean), torch.tensor(fb32.g_mean), rtol=1e-4)
    vfnb.vf_curve(vfnb.interpolate(a64, b64, 0.5), [a64, b64], d)
    vfnb.logit_stats(a64, d)
    # REPAIR keeps the dtype and matches float32
    r64 = vfnb.repair(vfnb.interpolate(a64, b64, 0.5), [a64, b64], [0.5, 0.5], d)
    r32 = vfnb.repair(vfnb.interpolate(a32, b32, 0.5), [a32, b32], [0.5, 0.5], d)
    assert next(r64.parameters()).dtype == torch.float64
    xs = d.tensors()[0]
    assert torch.allclose(r64(xs.double()).float(), r32(xs), rtol=1e-3, atol=1e-3)
    # Wanda and Fisher scores
    for method in ("wanda", "fisher"):
        s64 = vfnb.prune_scores(a64, method, d)
        s32 = vfnb.prune_scores(a32, method, d)
        for k in s32:
            assert torch.allclose(s64[k].float(), s32[k].float(), rtol=1e-3, atol=1e-8)
    # matching, PFM and the cost counter
    perm = vfnb.activation_matching(a64, b64, d)
    pfm = vfnb.preserve_first(a64, b64, perm, 3, normalize="repair", data=d)
    assert vfnb.evaluate(pfm, d)["loss"] > 0
    assert vfnb.count_cost(pfm, x)["params"] > vfnb.count_cost(a64, x)["params"]
    wm = vfnb.weight_matching(a64, b64, x)
    assert len(wm) == len(perm)


def test_models_of_different_dtypes_are_refused() -> None:
    with pytest.raises(ValueError, match="dtype mismatch"):
        vfnb.interpolate(vgg(0), vgg(1).double(), 0.5)


# --------------------------------------------------------------------------- 11. tied weights
class Tied(nn.Module):
    """Two hidden layers sharing one weight matrix (and one bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.h1 = nn.Linear(8, 8)
        self.h2 = nn.Linear(8, 8)
        self.h2.weight = self.h1.weight
        self.h2.bias = self.h1.bias
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.inp(x))
        x = torch.relu(self.h1(x))
        x = torch.relu(self.h2(x))
        return self.out(x)


def test_tied_weights_join_their_groups_and_keep_the_function() -> None:
    torch.manual_seed(0)
    model = Tied().eval()
    x = torch.randn(64, 6)
    spec = vfnb.permutation_spec(model, x[:1])
    assert len(spec.groups) == 1, spec.summary()  # h1's input, h1/h2's output and h2's input are one group
    for seed in range(3):
        permuted = vfnb.apply_permutation(model, vfnb.random_permutation(spec, seed))
        assert permuted.h1.weight is permuted.h2.weight  # still tied
        assert torch.allclose(permuted(x), model(x), atol=1e-6)
    # matching a permuted copy recovers the function exactly
    b = vfnb.apply_permutation(model, vfnb.random_permutation(spec, 7))
    aligned = vfnb.apply_permutation(b, vfnb.weight_matching(model, b, x[:1]))
    assert torch.allclose(aligned.h1.weight, model.h1.weight)


class Views(nn.Module):
    """A weight that is the transpose of another (shared memory, different view)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 4)
        self.b.weight = nn.Parameter(self.a.weight.data.t())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def test_weights_sharing_memory_as_different_views_are_refused() -> None:
    with pytest.raises(vfnb.UnsupportedOperationError, match="share memory"):
        vfnb.permutation_spec(Views(), torch.randn(1, 4))
