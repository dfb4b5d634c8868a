"""Multi-task merging: task vectors, Task Arithmetic, TIES, merging N models modulo permutation, TACT, the
per-layer statistics, the derived task datasets and fine-tuning from a foundation (init_from)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import vfnb
from vfnb import normalize
from vfnb.data import TASKS, load_dataset
from vfnb.multitask import head_layer


def mlp(seed: int, relu: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    return vfnb.build_model("mlp", in_features=6, num_classes=3, depth=3, width=5,
                            activation="relu" if relu else "none").eval()


def vgg(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return vfnb.build_model("vgg11", in_channels=1, num_classes=4, width=0.0625, input_size=8).eval()


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# --------------------------------------------------------------------------------------------------- task vectors
def test_task_arithmetic_is_base_plus_scaled_task_vectors_with_each_experts_head():
    base, e1, e2 = mlp(0), mlp(1), mlp(2)
    head = head_layer(base)
    mt = vfnb.task_arithmetic(base, [e1, e2], [0.3, 0.7])
    b, p1, p2 = params(base), params(e1), params(e2)
    for k, v in params(mt.body).items():
        if not k.startswith(head + "."):
            assert torch.allclose(v, b[k] + 0.3 * (p1[k] - b[k]) + 0.7 * (p2[k] - b[k]), atol=1e-6), k
    x = torch.randn(7, 6)
    for t, e in enumerate([e1, e2]):
        model = mt.for_task(t)
        hp = dict(model.named_parameters())
        assert torch.equal(hp[f"{head}.weight"], dict(e.named_parameters())[f"{head}.weight"])
        assert torch.allclose(mt(x, t), model(x), atol=1e-6)
    # scale 1/N is the plain average of the experts (the heads aside)
    avg = vfnb.average([e1, e2])
    mt = vfnb.task_arithmetic(base, [e1, e2], 0.5)
    for k, v in params(mt.body).items():
        if not k.startswith(head + "."):
            assert torch.allclose(v, dict(avg.named_parameters())[k], atol=1e-6)
    # the inputs are untouched
    assert all(torch.equal(v, b[k]) for k, v in params(base).items())


def test_ties_trims_elects_the_sign_of_the_total_mass_and_takes_the_disjoint_mean():
    # worked by hand: density 0.5 keeps 3 of the 6 entries of each vector (over both tensors together)
    rows = [[3, -1, 0.5, 2, -4, 0.2],        # keeps 3, 2, -4      -> [3, 0, 0, 2, -4, 0]
            [1, -3, 1.5, 0.1, 0.5, 2.5],     # keeps -3, 1.5, 2.5  -> [0, -3, 1.5, 0, 0, 2.5]
            [1, 2, -6, 0.1, 5, 1.5],         # keeps 2, -6, 5      -> [0, 2, -6, 0, 5, 0]
            [2, -1, 0.3, 0, 0, 0.1]]         # keeps 2, -1, 0.3    -> [2, -1, 0.3, 0, 0, 0]
    vectors = [{"a": torch.tensor(r[:4]).view(2, 2), "b": torch.tensor(r[4:])} for r in rows]
    # sums 5, -2, -4.2, 2, 1, 2.5 elect + - - + + +; agreeing entries: (3, 2), (-3, -1), (-6), (2), (5), (2.5)
    got = vfnb.ties_vector(vectors, density=0.5)
    assert torch.allclose(got["a"], torch.tensor([[2.5, -2.0], [-6.0, 2.0]]))
    assert torch.allclose(got["b"], torch.tensor([5.0, 2.5]))
    # density 1 keeps everything; an entry whose trimmed values sum to 0 elects no sign and stays 0
    tied = vfnb.ties_vector([{"a": torch.tensor([1.0, 2.0])}, {"a": torch.tensor([-1.0, 1.0])}], density=1.0)
    assert torch.allclose(tied["a"], torch.tensor([0.0, 1.5]))


def test_ties_merging_applies_the_ties_vector_to_the_base():
    base, experts = mlp(0), [mlp(1), mlp(2), mlp(3)]
    taus = vfnb.task_vectors(base, experts)
    vec = vfnb.ties_vector(taus, 0.3)
    mt = vfnb.ties_merging(base, experts, density=0.3, scale=0.8)
    b = params(base)
    for k, v in vec.items():
        assert torch.allclose(dict(mt.body.named_parameters())[k], b[k] + 0.8 * v, atol=1e-6)
    assert head_layer(base) + ".weight" not in vec  # heads stay per task


@pytest.mark.parametrize("call, match", [
    (lambda b, e: vfnb.ties_merging(b, e, density=0.0), "density"),
    (lambda b, e: vfnb.task_arithmetic(b, e, [1.0]), "one per expert"),
    (lambda b, e: vfnb.task_arithmetic(b, []), "at least one expert"),
    (lambda b, e: vfnb.task_arithmetic(b, [vgg(0)]), "architecture"),
])
def test_task_vector_merges_refuse_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(mlp(0), [mlp(1), mlp(2)])


# ------------------------------------------------------------------------------------------------------- merge_many
@pytest.mark.parametrize("method, strategy", [("weight", "reference"), ("weight", "mean"), ("activation", "reference")])
def test_merge_many_of_permuted_copies_is_the_model(method, strategy):
    model = vgg(0)
    x = torch.randn(64, 1, 8, 8)
    spec = vfnb.permutation_spec(model, x[:2])
    copies = [vfnb.apply_permutation(model, vfnb.random_permutation(spec, s)) for s in range(3)]
    merged = vfnb.merge_many(copies, method=method, strategy=strategy, data=x, example_input=x[:2])
    assert torch.allclose(merged(x), model(x), atol=1e-4)
    al = vfnb.align_many(copies, method=method, strategy=strategy, data=x, example_input=x[:2])
    assert al.converged and al.rounds == (1 if strategy == "mean" else 0)  # exact copies: nothing left to change
    for m in al.aligned:
        for (k, v), w in zip(m.state_dict().items(), copies[0].state_dict().values()):
            assert torch.allclose(v, w, atol=1e-6), k


def test_merge_many_without_alignment_is_the_weighted_average():
    a, b, c = mlp(0), mlp(1), mlp(2)
    m = vfnb.merge_many([a, b, c], [1, 1, 2], method=None)
    for k, v in params(m).items():
        assert torch.allclose(v, 0.25 * params(a)[k] + 0.25 * params(b)[k] + 0.5 * params(c)[k], atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "cca"}, "unknown matching method"),
    ({"strategy": "star"}, "unknown strategy"),
    ({"reference": 5}, "reference"),
    ({"method": "activation", "data": None}, "needs data"),
])
def test_align_many_refuses_bad_input(kwargs, match):
    x = torch.randn(4, 1, 8, 8)
    args = {"example_input": x, "data": x, **kwargs}
    with pytest.raises(ValueError, match=match):
        vfnb.align_many([vgg(0), vgg(1)], **args)
    with pytest.raises(ValueError, match="at least 2"):
        vfnb.align_many([vgg(0)], example_input=x)
    with pytest.raises(ValueError, match="weights"):
        vfnb.average([vgg(0), vgg(1)], [1.0, -1.0])


# ------------------------------------------------------------------------------------------------------------- TACT
def test_tact_gives_each_task_its_experts_pre_activation_statistics():
    e1, e2 = vgg(1), vgg(2)
    merged = vfnb.average([e1, e2])
    torch.manual_seed(5)
    data = [torch.randn(300, 1, 8, 8), 0.5 * torch.randn(300, 1, 8, 8) + 1.0]
    mt = vfnb.tact(merged, [e1, e2], data)
    for t, e in enumerate([e1, e2]):
        want = vfnb.layer_stats(e, data[t])
        got = vfnb.layer_stats(mt.for_task(t), data[t])
        for layer, (m, s) in want.items():
            assert torch.allclose(got[layer][0], m, atol=1e-4, rtol=1e-3), layer
            assert torch.allclose(got[layer][1], s, atol=1e-4, rtol=1e-3), layer
        # forward(x, t) folds the same corrections as for_task
        assert torch.allclose(mt(data[t][:16], t), mt.for_task(t)(data[t][:16]), atol=1e-5)
    # the scale-only variant matches the std but keeps the offset at 0
    rs = vfnb.tact(merged, [e1, e2], data, shift=False)
    assert all(float(o.abs().max()) == 0 for c in rs.corrections for _, o in c.as_dict().values())


def test_tact_of_an_expert_toward_itself_is_the_identity():
    e = vgg(3)
    x = torch.randn(200, 1, 8, 8)
    mt = vfnb.tact(e, [e], [x])
    for scale, offset in mt.corrections[0].as_dict().values():
        assert torch.allclose(scale, torch.ones_like(scale), atol=1e-4)
        assert torch.allclose(offset, torch.zeros_like(offset), atol=1e-4)
    assert torch.allclose(mt(x, 0), e(x), atol=1e-4)


def test_tact_is_saved_and_loaded_with_the_model_and_refuses_bad_input():
    e1, e2 = vgg(1), vgg(2)
    x = [torch.randn(50, 1, 8, 8), torch.randn(50, 1, 8, 8)]
    mt = vfnb.tact(vfnb.average([e1, e2]), [e1, e2], x)
    twin = vfnb.tact(vfnb.average([e1, e2]), [e1, e2], [torch.randn(50, 1, 8, 8)] * 2)
    twin.load_state_dict(mt.state_dict())
    assert torch.allclose(twin(x[0], 1), mt(x[0], 1))
    assert torch.allclose(mt(x[0], "task 1"), mt(x[0], 1))
    with pytest.raises(ValueError, match="one per task"):
        vfnb.tact(e1, [e1, e2], x[:1])
    with pytest.raises(ValueError, match="already carries corrections"):
        vfnb.tact(mt, [e1, e2], x)
    with pytest.raises(ValueError, match="task must be"):
        mt(x[0], 2)


def test_corrections_fold_exactly_as_repair_does():
    model, ref = vgg(4), vgg(5)
    x = torch.randn(100, 1, 8, 8)
    targets = vfnb.layer_stats(ref, x)
    repaired = vfnb.repair(model, data=x, targets=targets)
    folded = normalize.folded_parameters(model, normalize.corrections(model, x, targets))
    for k, v in folded.items():
        assert torch.allclose(v, dict(repaired.named_parameters())[k], atol=1e-6), k
    assert all(torch.equal(v, w) for v, w in zip(model.state_dict().values(), vgg(4).state_dict().values()))


# ------------------------------------------------------------------------------------------ probes and statistics
def test_linear_probe_fits_the_heads_as_well_as_scikit_learns_logistic_regression():
    from sklearn.linear_model import LogisticRegression
    e1, e2 = vgg(1), vgg(2)
    torch.manual_seed(0)
    images = torch.randint(0, 255, (300, 1, 8, 8), dtype=torch.uint8)
    labels = (images.float()[:, 0, :4].mean((1, 2)) > images.float()[:, 0, 4:].mean((1, 2))).long()
    data = vfnb.VisionData("toy", images, labels, (0.5,), (0.3,), num_classes=4)
    mt = vfnb.task_arithmetic(vfnb.average([e1, e2]), [e1, e2], 0.5)
    probed = vfnb.linear_probe(mt, [data, data], weight_decay=1e-4)
    feats, y = vfnb.multitask.features(mt.for_task(0), data)
    reference = LogisticRegression(C=1 / (2 * 1e-4 * len(y)), max_iter=5000).fit(feats.double().numpy(), y.numpy())
    ours = vfnb.evaluate(probed.for_task(0), data)["accuracy"]
    assert ours >= reference.score(feats.double().numpy(), y.numpy()) - 0.02
    assert ours > vfnb.evaluate(mt.for_task(0), data)["accuracy"]
    assert all(torch.equal(v, w) for v, w in zip(probed.body.state_dict().values(), mt.body.state_dict().values()))


def test_activation_gap_is_zero_against_itself_and_sees_a_collapse():
    model = vgg(1)
    x = torch.randn(100, 1, 8, 8)
    rows = vfnb.activation_gap(model, model, x)
    assert len(rows) == len(vfnb.structure_of(model).layers) - 1
    assert all(r["distance"] == 0 and abs(r["variance ratio"] - 1) < 1e-9 for r in rows)
    # halving the first layer's weights and bias halves every later activation of a ReLU net without norms:
    # the variance falls to 1/4 at every layer
    half = copy.deepcopy(model)
    first = vfnb.structure_of(half).layers[0]
    with torch.no_grad():
        for p in dict(half.named_modules())[first].parameters():
            p.mul_(0.5)
    for r in vfnb.activation_gap(half, model, x):
        assert r["variance ratio"] == pytest.approx(0.25, rel=1e-6)
        assert r["distance"] == pytest.approx(0.5, rel=1e-6)


# ------------------------------------------------------------------------------------------ data and fine-tuning
def test_task_datasets_are_derived_from_the_embedded_digits():
    mnist = load_dataset("mnist5k", "test")
    inv, rot = load_dataset("mnist5k-inverted", "test"), load_dataset("mnist5k-rot90", "test")
    assert torch.equal(inv.images, 255 - mnist.images) and torch.equal(inv.labels, mnist.labels)
    assert torch.equal(rot.images, torch.rot90(mnist.images, 1, dims=(2, 3)))
    low, high = load_dataset("mnist5k-0to4", "train"), load_dataset("mnist5k-5to9", "train")
    assert int(low.labels.max()) == 4 and int(high.labels.min()) == 5
    assert len(low) + len(high) == len(load_dataset("mnist5k", "train"))
    d_train, d_test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert (len(d_train), len(d_test)) == (1437, 360) and d_train.images.shape[1:] == (1, 28, 28)
    assert set(d_test.labels.tolist()) == set(range(10))
    for t in TASKS:
        assert vfnb.data.dataset_shape(t) == (1, 28, 10)
    from vfnb.config import TASK_NAMES  # config cannot import data, so it lists the tasks again
    assert set(TASK_NAMES) == set(TASKS)


def test_init_from_fine_tunes_the_foundation_and_keeps_older_keys(tmp_path):
    found = vfnb.recipe("mlp", "smoke", width=8, depth=2, epochs=1, n_train=64)
    assert "init_from" not in found.to_dict()  # configurations without it keep their zoo keys
    expert = found.replace(dataset="mnist5k-inverted", init_from=found)
    assert expert.foundation == found and expert.key != found.replace(dataset="mnist5k-inverted").key
    with pytest.raises(ValueError, match="same architecture"):
        found.replace(init_from=found.replace(model_kwargs={"width": 4, "depth": 2}))
    model = vfnb.get_or_train(expert, tmp_path, progress=False)
    base = vfnb.get_or_train(found, tmp_path, progress=False)  # trained first, as the expert's start
    assert vfnb.zoo.info(found, tmp_path)["metrics"]["test_accuracy"] > 0
    start = vfnb.train.train(expert.replace(epochs=1, lr=1e-12), load_dataset("mnist5k-inverted", "train").subset(
        range(64)), init_state=base.state_dict(), progress=False)[0]
    for (k, v), w in zip(start.state_dict().items(), base.state_dict().values()):
        assert torch.allclose(v, w, atol=1e-6), k  # a vanishing step: the start is the foundation
    assert any(not torch.equal(v, w) for v, w in zip(model.state_dict().values(), base.state_dict().values()))
    with pytest.raises(ValueError, match="init_state"):
        vfnb.train.train(expert, load_dataset("mnist5k-inverted", "train").subset(range(8)), progress=False)


def test_multitask_and_tact_guard_the_heads_and_own_their_bodies():
    e1, e2 = vgg(1), vgg(2)
    x = [torch.randn(40, 1, 8, 8), torch.randn(40, 1, 8, 8)]
    merged = vfnb.task_arithmetic(vfnb.average([e1, e2]), [e1, e2], 0.5)
    head = merged.head
    with pytest.raises(ValueError, match="heads are per task"):
        vfnb.tact(merged, [e1, e2], x, layers=[vfnb.structure_of(e1).layers[0], head])
    with pytest.raises(ValueError, match="corrections of the head"):
        vfnb.MultiTask(merged.body, list(merged.heads), corrections=[{head: (torch.ones(4), torch.zeros(4))}] * 2)
    with pytest.raises(ValueError, match="does not fit"):
        vfnb.MultiTask(merged.body, [nn.Linear(merged.heads[0].in_features, 4, bias=False)])
    corrected = vfnb.tact(merged, [e1, e2], x, names=["a", "b"])
    assert corrected.body is not merged.body and corrected.names == ["a", "b"]
    corrected.double()
    assert merged(x[0], 0).dtype == torch.float32  # the merge it came from is untouched
    # the corrections' layer names travel with the state dict
    other = vfnb.tact(merged, [e1, e2], x, layers=vfnb.structure_of(e1).layers[:2])
    with pytest.raises(ValueError, match="corrections are for layers"):
        other.load_state_dict(corrected.state_dict())


def test_init_from_refuses_data_of_another_shape_and_a_cached_expert_needs_no_foundation(tmp_path):
    import shutil
    found = vfnb.recipe("mlp", "smoke", width=8, depth=2, epochs=1, n_train=64)
    with pytest.raises(ValueError, match="does not fit"):
        found.replace(dataset="cifar10", init_from=found)
    expert = found.replace(dataset="digits", init_from=found)
    vfnb.get_or_train(expert, tmp_path, progress=False)
    shutil.rmtree(vfnb.zoo.entry_dir(found, tmp_path))
    vfnb.get_or_train(expert, tmp_path, progress=False)  # a hit: the foundation is not needed (nor retrained)
    assert not vfnb.zoo.entry_dir(found, tmp_path).exists()


def test_tall_masks_keep_the_entries_where_a_tasks_own_vector_dominates():
    base, experts = mlp(0), [mlp(1), mlp(2), mlp(3)]
    taus = vfnb.task_vectors(base, experts)
    merged = vfnb.task_arithmetic(base, experts, 0.5)
    masks = vfnb.tall_masks(base, experts, merged, lam=[0.2, 0.4, 0.6])
    for lam, tau, m in zip([0.2, 0.4, 0.6], taus, masks):
        for k in tau:
            mtl = 0.5 * sum(t[k] for t in taus)
            assert torch.equal(m[k], tau[k].abs() >= lam * (mtl - tau[k]).abs()), k
    # each task's network is θ_base + m_t ∘ τ_MTL, with its own head
    tall = vfnb.tall_merging(base, experts, scale=0.5, lam=0.4)
    head = head_layer(base)
    for t in range(3):
        got = dict(tall.for_task(t).named_parameters())
        for k, v in params(base).items():
            if k.startswith(head + "."):
                assert torch.equal(got[k], dict(experts[t].named_parameters())[k])
            else:
                mtl = 0.5 * sum(tv[k] for tv in taus)
                want = v + vfnb.tall_masks(base, experts, merged, 0.4)[t][k].float() * mtl
                assert torch.allclose(got[k], want, atol=1e-6), k
        x = torch.randn(5, 6)
        assert torch.allclose(tall(x, t), tall.for_task(t)(x), atol=1e-6)
    # λ = 0 keeps every entry: Task Arithmetic itself; one expert at scale 1 is the expert
    ta = vfnb.tall_merging(base, experts, scale=0.5, lam=0.0)
    x = torch.randn(5, 6)
    assert torch.allclose(ta(x, 1), merged(x, 1), atol=1e-6)
    one = vfnb.tall_merging(base, experts[:1], scale=1.0, lam=0.7)
    assert torch.allclose(one(x, 0), experts[0](x), atol=1e-5)


def test_tact_on_a_tall_model_matches_each_experts_statistics_and_survives_a_state_dict_round_trip():
    base, e1, e2 = vgg(0), vgg(1), vgg(2)
    data = [torch.randn(200, 1, 8, 8), torch.randn(200, 1, 8, 8) + 0.5]
    tall = vfnb.tall_merging(base, [e1, e2], scale=0.5, lam=0.4)
    fixed = vfnb.tact(tall, [e1, e2], data)
    assert fixed.masks is not None and fixed.body is not tall.body
    for t, e in enumerate([e1, e2]):
        want, got = vfnb.layer_stats(e, data[t]), vfnb.layer_stats(fixed.for_task(t), data[t])
        for layer, (m, s) in want.items():
            assert torch.allclose(got[layer][0], m, atol=1e-4, rtol=1e-3) and torch.allclose(got[layer][1], s,
                                                                                             atol=1e-4, rtol=1e-3)
        assert torch.allclose(fixed(data[t][:8], t), fixed.for_task(t)(data[t][:8]), atol=1e-5)
    twin = vfnb.tact(vfnb.tall_merging(base, [e1, e2], scale=0.5, lam=0.4), [e1, e2], [d + 1 for d in data])
    twin.load_state_dict(fixed.state_dict())
    assert torch.allclose(twin(data[0][:8], 0), fixed(data[0][:8], 0))
    with pytest.raises(ValueError, match="need the base"):
        vfnb.MultiTask(tall.body, list(tall.heads), masks=[m.as_dict() for m in tall.masks])
    with pytest.raises(ValueError, match="one network per task"):
        tall.with_body(tall.body)
