import pytest

from vfnb import ConfigError, resolve
from vfnb.config import EXPERIMENTS, PROFILES, describe


@pytest.mark.parametrize("profile", PROFILES)
def test_profiles_resolve_to_valid_configs(profile):
    cfg = resolve("linear", profile=profile)
    assert cfg.profile == profile and cfg.depth == 8 and cfg.width == 32
    assert cfg.alphas[0] == 0 and cfg.alphas[-1] == 1 and cfg.alpha in cfg.alphas


def test_explicit_values_override_profile_and_none_means_default():
    cfg = resolve("linear", profile="smoke", epochs=3, alpha=0.3, width=None)
    assert cfg.epochs == 3 and cfg.alpha == 0.3 and cfg.width == EXPERIMENTS["linear"]["smoke"]["width"]
    assert 0.3 in cfg.alphas  # the chosen α is always on the grid
    with pytest.raises(AttributeError, match="read-only"):
        cfg.epochs = 4


def test_unknown_parameter_names_it_and_lists_allowed():
    with pytest.raises(ConfigError, match=r"'alpah'.*allowed: profile, alpha"):
        resolve("linear", alpah=0.3)


@pytest.mark.parametrize("name,value,allowed", [
    ("alpha", 1.5, r"\[0, 1\]"), ("alpha", True, r"\[0, 1\]"), ("epochs", 0, "integer"),
    ("seeds", [3, 3], "distinct"), ("seeds", [1], ">= 2"), ("dataset", "imagenet", "mnist5k"),
    ("lr", float("nan"), r"\(0, 10\]"), ("device", "tpu", "cuda"),
])
def test_bad_values_name_parameter_and_rule(name, value, allowed):
    with pytest.raises(ConfigError, match=rf"'{name}'.*{allowed}"):
        resolve("linear", **{name: value})


def test_unknown_profile_and_experiment():
    with pytest.raises(ConfigError, match="profile.*smoke, cpu, paper"):
        resolve("linear", profile="laptop")
    with pytest.raises(ConfigError, match="unknown experiment"):
        resolve("nope")


def test_describe_lists_every_parameter():
    text = describe("linear")
    for name in EXPERIMENTS["linear"]["cpu"]:
        assert name in text
