import pytest

from vfnb import ConfigError, resolve
from vfnb.config import EXPERIMENTS, PROFILES, describe


@pytest.mark.parametrize("profile", PROFILES)
def test_profiles_resolve_to_valid_configs(profile):
    cfg = resolve("linear_networks", profile=profile)
    assert cfg.profile == profile and cfg.depth == 8 and cfg.width == 32
    assert cfg.alphas[0] == 0 and cfg.alphas[-1] == 1 and cfg.alpha in cfg.alphas


def test_explicit_values_override_profile_and_none_means_default():
    cfg = resolve("linear_networks", profile="smoke", epochs=3, alpha=0.3, width=None)
    assert cfg.epochs == 3 and cfg.alpha == 0.3 and cfg.width == EXPERIMENTS["linear_networks"]["smoke"]["width"]
    assert 0.3 in cfg.alphas  # the chosen α is always on the grid
    with pytest.raises(AttributeError, match="read-only"):
        cfg.epochs = 4


def test_unknown_parameter_names_it_and_lists_allowed():
    with pytest.raises(ConfigError, match=r"'alpah'.*allowed: profile, alpha"):
        resolve("linear_networks", alpah=0.3)


@pytest.mark.parametrize("name,value,allowed", [
    ("alpha", 1.5, r"\[0, 1\]"), ("alpha", True, r"\[0, 1\]"), ("epochs", 0, "integer"),
    ("seeds", [3, 3], "distinct"), ("seeds", [1], ">= 2"), ("dataset", "imagenet", "mnist5k"),
    ("lr", float("nan"), r"\(0, 10\]"), ("device", "tpu", "cuda"),
])
def test_bad_values_name_parameter_and_rule(name, value, allowed):
    with pytest.raises(ConfigError, match=rf"'{name}'.*{allowed}"):
        resolve("linear_networks", **{name: value})


def test_unknown_profile_and_experiment():
    with pytest.raises(ConfigError, match="profile.*smoke, cpu, paper"):
        resolve("linear_networks", profile="laptop")
    with pytest.raises(ConfigError, match="unknown experiment"):
        resolve("nope")


def test_describe_lists_every_parameter():
    text = describe("linear_networks")
    for name in EXPERIMENTS["linear_networks"]["cpu"]:
        assert name in text


# --------------------------------------------------------------------------- every chapter, every profile
def test_every_profile_of_every_chapter_resolves_silently_with_the_same_names():
    import warnings
    for experiment, profiles in EXPERIMENTS.items():
        assert all(list(profiles[p]) == list(profiles["cpu"]) for p in PROFILES), experiment
        for profile in PROFILES:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no default is clamped or rejected
                resolve(experiment, profile)


# --------------------------------------------------------------------------- chapter_config and Config.replace
def test_chapter_config_reads_only_the_declared_names():
    from vfnb.config import chapter_config, parameter_names
    names = parameter_names("linear_networks")
    namespace = {n: None for n in names} | {"profile": "smoke", "alpha": 0.3, "plots": object(), "x": 1}
    cfg = chapter_config("linear_networks", namespace)
    assert cfg == resolve("linear_networks", "smoke", alpha=0.3) and cfg.experiment == "linear_networks"
    assert "x" not in cfg and list(cfg) == names


def test_chapter_config_names_a_missing_parameter_and_the_fix():
    from vfnb.config import chapter_config, parameter_names
    namespace = {n: None for n in parameter_names("pruning") if n not in ("n_calib", "pruners")} | {"profile": "cpu"}
    with pytest.raises(ConfigError, match=r"'pruning' takes parameter\(s\) n_calib, pruners.*`n_calib = None`"):
        chapter_config("pruning", namespace)
    with pytest.raises(ConfigError, match="unknown experiment 'pfm'"):
        chapter_config("pfm", {})


def test_config_replace_revalidates():
    cfg = resolve("enhanced_normalization", "smoke")
    new = cfg.replace(weight_decay=1e-4)
    assert new.weight_decay == 1e-4 and cfg.weight_decay == 1e-2 and new.experiment == cfg.experiment
    assert {k: v for k, v in new.items() if k != "weight_decay"} == {k: v for k, v in cfg.items() if k != "weight_decay"}
    assert cfg.replace(lr=1).lr == 1.0 and isinstance(cfg.replace(lr=1).lr, float)  # coerced like resolve
    assert cfg.replace() == cfg
    with pytest.raises(ConfigError, match=r"'weight_decay' = 2.0 is not allowed"):
        cfg.replace(weight_decay=2.0)
    with pytest.raises(ConfigError, match=r"unknown parameter\(s\) 'wd'"):
        cfg.replace(wd=0.1)
    with pytest.raises(ConfigError, match=r"resolve\('enhanced_normalization', profile='cpu'\)"):
        cfg.replace(profile="cpu")
    with pytest.raises(ConfigError, match="seeds"):  # cross-parameter rules run again too
        cfg.replace(seeds=[0, 1, 2])
    with pytest.raises(AttributeError, match=r"cfg.replace"):
        cfg.alpha = 0.1


# --------------------------------------------------------------------------- hardening (items 8, 9, 10, 12)
def test_extra_seeds_are_rejected_where_a_chapter_merges_one_pair():
    """Item 8: chapter 02 with seeds [0, 1, 2] used to drop seed 2 silently."""
    with pytest.raises(ConfigError, match=r"'seeds' = \[0, 1, 2\] has 3 seeds.*'preliminaries'.*exactly 2"):
        resolve("preliminaries", seeds=[0, 1, 2])
    for chapter in ("linear_networks", "vanishing_feature", "merging_through_vf", "enhanced_normalization"):
        with pytest.raises(ConfigError, match="exactly 2"):
            resolve(chapter, "smoke", seeds=[0, 1, 2, 3])
    # preserve-first merging averages over pairs of consecutive seeds: an even count is used in full
    assert resolve("preserve_first_merging", "smoke", seeds=[0, 1, 2, 3]).seeds == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match=r"odd number of seeds.*seed 2 would have no partner"):
        resolve("preserve_first_merging", "smoke", seeds=[0, 1, 2])


def test_oversized_sizes_are_clamped_with_a_warning_naming_the_parameter():
    """Item 8: n_test / n_match / n_calib / n_diag above their split were clamped silently."""
    from vfnb.config import ConfigWarning
    with pytest.warns(ConfigWarning, match=r"'n_test' = 5000 is larger than the test split of mnist5k \(1000 images\): using 1000"):
        cfg = resolve("linear_networks", "cpu", n_test=5000)
    assert cfg.n_test == 1000
    with pytest.warns(ConfigWarning, match=r"'n_match' = 100000 .*training split of mnist5k \(4000 images\): using 4000"):
        assert resolve("preliminaries", "cpu", n_match=100_000).n_match == 4000
    with pytest.warns(ConfigWarning, match=r"'n_calib' = 512 is larger than the calibration pool \(n_match\) \(256"):
        assert resolve("pruning", "smoke", n_calib=512).n_calib == 256
    with pytest.warns(ConfigWarning, match=r"'n_match' = 4000 .*left after n_val \(3500 images\)"):
        assert resolve("enhanced_normalization", "cpu", n_match=4000).n_match == 3500
    with pytest.warns(ConfigWarning, match=r"'n_diag' = 600 .*n_match training images it is drawn from \(500"):
        assert resolve("preserve_first_merging", "cpu", n_diag=600).n_diag == 500
    with pytest.raises(ConfigError, match=r"'n_train' = 5000 is larger than the training split of mnist5k"):
        resolve("linear_networks", "cpu", n_train=5000)  # part of the zoo key: not clamped
    with pytest.raises(ConfigError, match=r"'n_val' = 4000 leaves no training images"):
        resolve("enhanced_normalization", "cpu", n_val=4000)


def test_split_sizes_match_the_data():
    from vfnb.config import SPLIT_SIZES
    from vfnb.data import load_dataset
    assert SPLIT_SIZES["mnist5k"] == (len(load_dataset("mnist5k", "train")), len(load_dataset("mnist5k", "test")))


def test_layer_numbers_are_bounded_by_the_architecture_in_resolve():
    """Item 9: resnet_layers [0, 99] and sweep_layers used to fail only half-way through chapter 05.4."""
    from vfnb.config import num_layers
    from vfnb.models import build_model
    from vfnb.structure import conv_linear_layers
    assert {m: num_layers(m) for m in ("vgg11", "vgg13", "vgg16", "vgg19", "resnet20")} == \
        {"vgg11": 9, "vgg13": 11, "vgg16": 14, "vgg19": 17, "resnet20": 20}
    assert num_layers("vgg16") == len(conv_linear_layers(build_model("vgg16", width=0.25, in_channels=1, input_size=28)))
    with pytest.raises(ConfigError, match=r"'resnet_layers' = \[0, 99\] has value\(s\) \[99\] above 20.*resnet20"):
        resolve("preserve_first_merging", "smoke", resnet_layers=[0, 99])
    for name in ("sweep_layers", "pfm_layers", "zip_layers"):
        with pytest.raises(ConfigError, match=rf"'{name}' = \[0, 15\] has value\(s\) \[15\] above 14.*vgg16"):
            resolve("preserve_first_merging", "smoke", **{name: [0, 15]})
    assert resolve("preserve_first_merging", "smoke", model="vgg19", sweep_layers=[0, 17]).sweep_layers == [0, 17]
    assert resolve("preserve_first_merging", "smoke", resnet_layers=[0, 20]).resnet_layers == [0, 20]


@pytest.mark.parametrize("name,text,value", [
    ("seeds", "[2, 3]", [2, 3]), ("seeds", "2, 3", [2, 3]), ("pruners", "[magnitude, wanda]", ["magnitude", "wanda"]),
    ("sparsities", "[0.5, 0.9]", [0.5, 0.9]), ("compare_weight_decay", "[1e-4]", [1e-4]),
    ("compare_weight_decay", "[]", []), ("sweep_layers", "None", None),
])
def test_list_parameters_given_as_text_are_parsed(name, text, value):
    """Item 10: papermill's -p seeds "[2, 3]" passes a string."""
    from vfnb.config import chapter_config, parameter_names
    chapter = next(c for c in EXPERIMENTS if name in EXPERIMENTS[c]["smoke"])
    cfg = resolve(chapter, "smoke", **{name: text})
    assert cfg[name] == (EXPERIMENTS[chapter]["smoke"][name] if value is None else value)
    namespace = {n: None for n in parameter_names(chapter)} | {"profile": "smoke", name: text}
    assert chapter_config(chapter, namespace)[name] == cfg[name]


def test_text_that_is_not_a_list_says_how_to_pass_one():
    with pytest.raises(ConfigError, match=r"'seeds' = '2 3' is text that is not a list.*-y \"seeds: \[2, 3\]\".*vfnb run"):
        resolve("linear_networks", seeds="2 3")
    with pytest.raises(ConfigError, match=r"'seeds' = \[2\] is not allowed"):
        resolve("linear_networks", seeds="[2]")
    with pytest.raises(ConfigError, match="is text that is not a list"):
        resolve("linear_networks", seeds="__import__('os')")  # never evaluated


#: The paper's Table 2 (appendix A.3), one row per model family that the book trains.
TABLE2 = {
    "Linear Network": {"dataset": "mnist", "optimizer": "adam", "lr": 0.01, "schedule": "constant", "batch_size": 128,
                       "weight_decay": 1e-4, "epochs": 20},
    "VGG16(-BN/LN)": {"dataset": "cifar10", "optimizer": "sgd", "lr": 0.1, "schedule": "step", "batch_size": 128,
                      "weight_decay": 1e-4, "epochs": 160},
    "ResNet20": {"dataset": "cifar10", "optimizer": "sgd", "lr": 0.1, "schedule": "step", "batch_size": 128,
                 "weight_decay": 1e-4, "epochs": 160},
    "ResNet20-LN": {"dataset": "cifar10", "optimizer": "sgd", "lr": 0.1, "schedule": "warmup_step", "batch_size": 128,
                    "weight_decay": 1e-4, "epochs": 160},
}


def _table2_row(c) -> str:
    if c.model == "mlp":
        return "Linear Network"
    if c.model == "resnet20":
        return "ResNet20-LN" if c.model_kwargs.get("norm") == "ln" else "ResNet20"
    return "VGG16(-BN/LN)"


def _paper_train_configs():
    """Every edge model the chapters train under ``paper``, built by the chapters' own code."""
    from vfnb.chapters import common, experimental_setup, merging_through_vf, preserve_first_merging
    out = [(f"experimental_setup: {name}", c) for name, cs in
           experimental_setup.edge_configs(resolve("experimental_setup", "paper")).items() for c in cs]
    for chapter in ("preliminaries", "enhanced_normalization", "preserve_first_merging"):
        cfg = resolve(chapter, "paper")
        out += [(chapter, c) for c in common.edge_configs(cfg)]
    out += [("preliminaries (BN pair)", c) for c in common.edge_configs(resolve("preliminaries", "paper"), norm="bn")]
    out += [("preserve_first_merging (ResNet20)", c)
            for c in common.edge_configs(preserve_first_merging.resnet_config(resolve("preserve_first_merging", "paper")))]
    for chapter in ("vanishing_feature", "merging_through_vf"):
        cfg = resolve(chapter, "paper")
        for label, (model, norm) in common.ARCHS.items():
            out += [(f"{chapter}: {label}", c) for c in common.edge_configs(common.arch_cfg(cfg, model), model=model,
                                                                            norm=norm)]
    cfg = resolve("merging_through_vf", "paper")
    out += [("merging_through_vf: MLP", c) for r in (False, True) for c in merging_through_vf.mlp_configs(cfg, r)]
    pcfg = resolve("pruning", "paper")
    out += [("pruning", common.edge_configs(pcfg, norm=n, seeds=[pcfg.seed])[0]) for n in ("ln", "bn")]
    return out


def test_paper_profile_trains_every_edge_model_with_table_2():
    """Item 12: the linear MLPs trained 5 epochs under ``paper``; Table 2 says 20."""
    configs = _paper_train_configs()
    assert {_table2_row(c) for _, c in configs} == set(TABLE2)
    bad = []
    for where, c in configs:
        row = TABLE2[_table2_row(c)]
        got = {k: getattr(c, k) for k in row}
        if got != row:
            bad.append(f"{where} ({c.model}, {c.model_kwargs}): {got} != Table 2 {row}")
    assert not bad, "\n".join(bad)


def test_paper_profile_values_in_experiments_follow_table_2():
    for chapter, profiles in EXPERIMENTS.items():
        d = profiles["paper"]
        if chapter == "multitask_merging":  # beyond the paper: foundations for fine-tuning, not Table 2's models
            continue
        if "mlp_depth" in d:  # Fig. 3D's linear networks
            assert (d["mlp_epochs"], d["mlp_dataset"]) == (20, "mnist"), chapter
        if "lr" in d and "vit_depth" not in d:  # Table 2 has no ViT (A.8.4 used Imfeld et al.'s checkpoints)
            row = TABLE2["Linear Network" if "depth" in d else "VGG16(-BN/LN)"]
            assert (d["lr"], d["weight_decay"], d["batch_size"]) == (row["lr"], row["weight_decay"], row["batch_size"])
            assert d["epochs"] == row["epochs"] and d["dataset"] == row["dataset"], chapter


def test_paper_recipes_default_follows_table_2():
    from vfnb.train import PAPER_RECIPES
    for family, row in (("mlp", TABLE2["Linear Network"]), ("cnn", TABLE2["VGG16(-BN/LN)"])):
        assert {k: PAPER_RECIPES[family][k] for k in row if k != "dataset"} == {k: v for k, v in row.items()
                                                                              if k != "dataset"}, family
