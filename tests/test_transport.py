"""OT fusion (``vfnb.ot_matching``) and attention heads that move as wholes (issue 14).

Independent facts checked:
- for a permuted copy of a model, the exact transport plan is that permutation and the merge reproduces the
  model (a ViT whose heads were reordered, and a VGG);
- an entropic plan is doubly stochastic (T = n·P), and is the exact plan in the limit of small regularization;
- ``transport_plan`` solves a hand-made problem whose optimum is known;
- the head-constrained assignment of ``solve_step`` equals a brute force over every head order and inner matching;
- a permutation that splits a head, or gives q/k and v different head orders, is refused;
- PFM with a transport alignment is the plain merge at l = 0 and the ensemble at l = L;
- ``layer_outputs`` reads a module's input with ``":input"``; ``block_depths`` counts a ViT's stages.
"""
import itertools

import numpy as np
import pytest
import torch

import vfnb
from vfnb.diagnose import layer_outputs
from vfnb.graph import Group, Heads, Permutation, apply_permutation, head_order, permutation_spec, random_permutation
from vfnb.matching import solve_step
from vfnb.merge import interpolate
from vfnb.pfm import ChannelMap, preserve_first
from vfnb.structure import block_depths
from vfnb.transport import TransportAlignment, ot_matching, transport_plan


def vit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return vfnb.build_model("vit", in_channels=1, num_classes=10, input_size=28, depth=2, num_heads=3,
                            patch_size=7, width=0.5).eval().double()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(96, 1, 28, 28, generator=torch.Generator().manual_seed(0)).double()


@pytest.fixture(scope="module")
def permuted(x):
    """A ViT, and a copy whose every group (heads reordered too) was randomly permuted."""
    a = vit()
    spec = permutation_spec(a, x[:2])
    seed = next(s for s in range(50) if all(head_order(spec.groups[g].heads, random_permutation(spec, s)[g])
                                            != [0, 1, 2] for g in spec.head_links()[0]))
    perm = random_permutation(spec, seed)
    return a, apply_permutation(a, perm), perm


def same_state(m1, m2, tol=1e-10) -> bool:
    return all(torch.allclose(u, v, atol=tol) for u, v in zip(m1.state_dict().values(), m2.state_dict().values())
               if u.is_floating_point())


@torch.no_grad()
def test_random_permutation_reorders_heads_and_keeps_the_function(permuted, x):
    a, pa, perm = permuted
    links = perm.spec.head_links()
    assert len(links) == 2 and all(len(g) == 2 for g in links.values())  # (q/k, v) per attention
    orders = [head_order(perm.spec.groups[g].heads, perm[g]) for g in links[0]]
    assert orders[0] == orders[1] != [0, 1, 2]
    assert torch.allclose(a(x), pa(x), atol=1e-10)


def test_a_permutation_that_splits_a_head_is_refused(permuted):
    _, _, perm = permuted
    qk = perm.spec.head_links()[0][0]
    blocks = perm.spec.groups[qk].heads.blocks
    split = list(perm.perms)
    p = torch.arange(perm.spec.groups[qk].size)
    p[[blocks[0][0], blocks[1][0]]] = p[[blocks[1][0], blocks[0][0]]]  # swap one unit across two heads
    split[qk] = p
    with pytest.raises(ValueError, match="move every head as a whole"):
        Permutation(perm.spec, tuple(split))
    # q/k and v with different head orders
    vo = perm.spec.head_links()[0][1]
    vb = perm.spec.groups[vo].heads.blocks
    mixed = [torch.arange(g.size) for g in perm.spec.groups]
    q = torch.arange(perm.spec.groups[vo].size)
    q[list(vb[0]) + list(vb[1])] = torch.tensor(list(vb[1]) + list(vb[0]))
    mixed[vo] = q
    with pytest.raises(ValueError, match="one head order"):
        Permutation(perm.spec, tuple(mixed))


@pytest.mark.parametrize("method", ["wm", "am", "am-weights"])
def test_matching_recovers_reordered_heads(permuted, x, method):
    a, pa, _ = permuted
    if method == "wm":
        found = vfnb.weight_matching(a, pa, x[:2])
    else:
        found = vfnb.activation_matching(a, pa, x, attention="activations" if method == "am" else "weights")
    assert same_state(apply_permutation(pa, found), a)


def test_attention_units_are_read_through_the_projection(permuted, x):
    """The q/k and v groups of a self-attention are captured at the attention's input, through its
    in_proj rows; activation matching's option for them is checked."""
    a, _, perm = permuted
    for gis in perm.spec.head_links().values():
        for gi in gis:
            (c,) = perm.spec.groups[gi].captures
            assert c.proj is not None and c.proj[0].endswith("in_proj_weight") and c.node.endswith("ln_1")
    with pytest.raises(ValueError, match="attention must be"):
        vfnb.activation_matching(a, a, x, attention="qkv")


def test_solve_step_is_the_head_constrained_optimum():
    """Brute force over every head order and every inner matching of two linked groups (3 heads of 2)."""
    gen = torch.Generator().manual_seed(3)
    small = [Group(i, 6, 1, ("x",), (1,), (), (), Heads(0, ((0, 1), (2, 3), (4, 5)))) for i in range(2)]
    S = [torch.randn(6, 6, generator=gen, dtype=torch.float64) for _ in small]
    got = solve_step(small, S)
    assert head_order(small[0].heads, got[0]) == head_order(small[1].heads, got[1]) is not None
    value = sum(float(s[torch.arange(6), p].sum()) for s, p in zip(S, got))
    best = -np.inf
    for order in itertools.permutations(range(3)):
        total = 0.0
        for s in S:
            for h in range(3):
                src = [2 * order[h], 2 * order[h] + 1]
                total += max(float(s[2 * h, src[0]] + s[2 * h + 1, src[1]]), float(s[2 * h, src[1]] + s[2 * h + 1, src[0]]))
        best = max(best, total)
    assert value == pytest.approx(best, abs=1e-12)


def test_transport_plan_solves_a_known_problem():
    cost = torch.tensor([[0.0, 1.0, 4.0], [1.0, 0.0, 1.0], [4.0, 1.0, 0.0]]).flip(1)  # anti-diagonal is free
    plan = transport_plan(cost)
    assert torch.allclose(plan * 3, torch.eye(3).flip(1).double())
    soft = transport_plan(cost, reg=0.01)
    assert torch.allclose(soft.sum(0), torch.full((3,), 1 / 3, dtype=torch.float64), atol=1e-8)
    assert torch.allclose(soft.sum(1), torch.full((3,), 1 / 3, dtype=torch.float64), atol=1e-8)
    assert torch.allclose(soft * 3, torch.eye(3).flip(1).double(), atol=1e-6)  # small reg: the exact plan
    wide = transport_plan(cost, reg=100.0)
    assert torch.allclose(wide * 3, torch.full((3, 3), 1 / 3, dtype=torch.float64), atol=1e-2)  # large: uniform
    with pytest.raises(ValueError, match="reg must be"):
        transport_plan(cost, reg=-1.0)
    with pytest.raises(ValueError, match="non-finite"):
        transport_plan(torch.tensor([[0.0, float("nan")], [1.0, 0.0]]))


@torch.no_grad()
def test_exact_ot_of_a_permuted_vit_is_the_permutation_and_the_merge_is_the_model(permuted, x):
    a, pa, perm = permuted
    al = ot_matching(a, pa, x)
    assert isinstance(al, TransportAlignment) and al.is_permutation()
    for g, t in zip(perm.spec.groups, al.transforms):
        # pa's unit j is a's unit perm[j]: T must send it back, T[perm[j], j] = 1 (heads reordered included)
        expected = torch.zeros(g.size, g.size, dtype=torch.float64)
        expected[perm[g.index], torch.arange(g.size)] = 1
        assert torch.equal(t, expected)
    merged = interpolate(a, al.apply(pa), 0.5)
    assert same_state(merged, a)
    assert torch.allclose(merged(x), a(x), atol=1e-10)


@torch.no_grad()
def test_exact_ot_map_is_the_inverse_permutation_on_a_vgg(x):
    torch.manual_seed(1)
    a = vfnb.build_model("vgg11", in_channels=1, num_classes=10, width=0.0625, input_size=28).eval().double()
    spec = permutation_spec(a, x[:2])
    perm = random_permutation(spec, 4)
    pa = apply_permutation(a, perm)
    al = ot_matching(a, pa, x)
    for g, t in zip(spec.groups, al.transforms):
        # pa's unit j is a's unit perm[j]: T must send it back, T[perm[j], j] = 1
        expected = torch.zeros(g.size, g.size, dtype=torch.float64)
        expected[perm[g.index], torch.arange(g.size)] = 1
        assert torch.equal(t, expected)
    assert same_state(al.apply(pa), a)


@torch.no_grad()
def test_entropic_maps_are_doubly_stochastic_and_pfm_ends_are_merge_and_ensemble(x):
    a, b = vit(0), vit(1)
    al = ot_matching(a, b, x, reg=0.05)
    assert not al.is_permutation()
    for t in al.transforms:
        assert torch.allclose(t.sum(0), torch.ones(len(t), dtype=torch.float64), atol=1e-6)
        assert torch.allclose(t.sum(1), torch.ones(len(t), dtype=torch.float64), atol=1e-6)
    merged = interpolate(a, al.apply(b), 0.3)
    assert torch.allclose(preserve_first(a, b, al, layers=0, alpha=0.3)(x), merged(x), atol=1e-10)
    L = al.spec.num_layers
    assert torch.allclose(preserve_first(a, b, al, layers=L, alpha=0.3)(x), 0.7 * a(x) + 0.3 * b(x), atol=1e-10)
    # a middle cut (after two encoder blocks' worth of layers) runs, with REPAIR on the merged tail
    p = preserve_first(a, b, al, layers=3, alpha=0.5, normalize="repair", data=x)
    assert torch.isfinite(p(x)).all()


def test_ot_matching_refuses_bad_input(x):
    a = vit()
    with pytest.raises(ValueError, match="reg must be"):
        ot_matching(a, a, x, reg=-0.1)
    bad = vit()
    with torch.no_grad():
        bad.heads.head.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN|non-finite"):
        ot_matching(a, bad, x)
    other = vfnb.build_model("vit", in_channels=1, num_classes=10, input_size=28, depth=3, num_heads=3,
                             patch_size=7, width=0.5).double()
    with pytest.raises(ValueError):
        ot_matching(a, other, x)
    al = ot_matching(a, vit(1), x)
    with pytest.raises(ValueError, match="another model_b"):
        al.apply(vit(2))


@torch.no_grad()
def test_input_points_and_block_depths(x):
    a = vit()
    pts = a.stream_points()
    assert pts[-1] == "encoder.ln:input" and len(pts) == len(a.stages())
    seen = {}
    h = a.encoder.ln.register_forward_pre_hook(lambda m, args: seen.setdefault("in", args[0].clone()))
    out = layer_outputs(a, x[:4], pts)
    h.remove()
    assert torch.equal(out["encoder.ln:input"], seen["in"])
    assert block_depths(a, a.stages()) == [1, 3, 5]
    with pytest.raises(ValueError, match="holds no conv/linear"):
        block_depths(a, ["encoder.ln"])
    with pytest.raises(ValueError, match="no module"):
        layer_outputs(a, x[:4], ["encoder.ln:output"])


def test_channel_map_acts_on_the_token_axis():
    m = torch.randn(4, 4)
    x = torch.randn(2, 3, 4)
    assert torch.allclose(ChannelMap(m, axis=2)(x), x @ m.T, atol=1e-6)
