"""Recipe validation: every bad input is one line naming file, line, key path and what is allowed."""

import pytest
import yaml

from eprun.errors import RecipeError
from eprun.recipe import from_plain, load_recipe, to_yaml

GOOD = """\
name: tiny
seed: 3
data:
  dataset: synthetic
  val_size: 100
  batch_size: 20
model:
  kind: mlp
  hidden: [16]
rule:
  kind: ep
  T: 8
  K: 4
  beta: 0.2
optim:
  kind: adam
  lr: [0.01, 0.005]
train:
  epochs: 1
"""


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(tmp_path, text, overrides=()):
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, text), list(overrides))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_good_recipe_builds_with_defaults(tmp_path):
    r = load_recipe(write(tmp_path, GOOD))
    assert r.name == "tiny" and r.seed == 3
    assert r.rule.kind == "ep" and r.rule.T == 8 and r.rule.beta == 0.2 and r.rule.estimator == "one-sided"
    assert r.model.hidden == [16] and r.model.activation == "sigmoid"
    assert r.optim.lr == [0.01, 0.005] and r.schedule.kind == "constant"
    assert r.data.eval_batch_size == 1000


def test_name_defaults_to_file_stem(tmp_path):
    text = GOOD.replace("name: tiny\n", "")
    assert load_recipe(write(tmp_path, text, "my-run.yaml")).name == "my-run"


def test_unknown_key_names_line_and_suggests(tmp_path):
    message = error_of(tmp_path, GOOD.replace("  beta: 0.2", "  betta: 0.2"))
    assert message.startswith(f"{tmp_path / 'r.yaml'}:14: rule.betta: unknown key")
    assert "did you mean 'beta'" in message
    assert "allowed:" in message and "estimator" in message


def test_unknown_section(tmp_path):
    message = error_of(tmp_path, GOOD + "optimiser:\n  lr: 1\n")
    assert "optimiser: unknown key" in message and "did you mean 'optim'" in message


def test_wrong_type_names_expected_type(tmp_path):
    message = error_of(tmp_path, GOOD.replace("  T: 8", "  T: eight"))
    assert ":12: rule.T: expected an integer, got 'eight'" in message


def test_float_accepts_int_but_int_rejects_float(tmp_path):
    assert load_recipe(write(tmp_path, GOOD.replace("beta: 0.2", "beta: 1"))).rule.beta == 1.0
    assert "rule.K: expected an integer" in error_of(tmp_path, GOOD.replace("K: 4", "K: 4.5"))


def test_literal_lists_allowed_values(tmp_path):
    message = error_of(tmp_path, GOOD.replace("beta: 0.2", "beta: 0.2\n  estimator: both"))
    assert "rule.estimator: expected 'one-sided' | 'positive'" in message and "'symmetric'" in message


def test_unknown_kind_lists_registry(tmp_path):
    message = error_of(tmp_path, GOOD.replace("kind: ep", "kind: epp"))
    assert "rule.kind: unknown kind 'epp'; did you mean 'ep'?" in message and "bp" in message


def test_yaml_syntax_error_names_line(tmp_path):
    message = error_of(tmp_path, GOOD.replace("  K: 4", "  K: [4"))
    assert "YAML syntax error" in message and f"{tmp_path / 'r.yaml'}:" in message


def test_top_level_must_be_mapping(tmp_path):
    assert "must be a YAML mapping" in error_of(tmp_path, "- a\n- b\n")


@pytest.mark.parametrize("edit, expected", [
    (("beta: 0.2", "beta: 0"), "rule.beta: must be non-zero"),
    (("T: 8", "T: -3"), "rule.T: must be between 1 and 100,000"),
    (("lr: [0.01, 0.005]", "lr: [0.01]"), "optim.lr: a list needs one entry per weight layer of the model (2), got 1"),
    (("lr: [0.01, 0.005]", "lr: -1"), "optim.lr: must be ≥ 0"),
    (("dataset: synthetic", "dataset: mnits"), "data.dataset: unknown dataset 'mnits'"),
    (("batch_size: 20", "batch_size: 0"), "data.batch_size: must be between 1 and 1,000,000"),
    (("epochs: 1", "epochs: 0"), "train.epochs: must be between 1 and 1,000,000,000"),
    (("seed: 3", "seed: -1"), "seed: must be between 0 and 9,223,372,036,854,775,807"),
    (("hidden: [16]", "hidden: []"), "model.hidden: needs at least one hidden layer"),
])
def test_out_of_range_values(tmp_path, edit, expected):
    assert expected in error_of(tmp_path, GOOD.replace(*edit))


def test_cross_section_error_points_at_the_key_line(tmp_path):
    message = error_of(tmp_path, GOOD.replace("lr: [0.01, 0.005]", "lr: [0.01]"))
    assert message.startswith(f"{tmp_path / 'r.yaml'}:17: optim.lr:")


def test_device_values(tmp_path):
    assert "device: expected auto, cpu, cuda or cuda:N" in error_of(tmp_path, GOOD + "device: gpu\n")
    assert load_recipe(write(tmp_path, GOOD + "device: cuda:1\n")).device == "cuda:1"


def test_dotted_overrides(tmp_path):
    path = write(tmp_path, GOOD)
    r = load_recipe(path, ["rule.beta=0.5", "train.epochs=3", "rule.estimator=symmetric", "model.hidden=[8, 4]",
                           "optim.lr=0.1"])
    assert r.rule.beta == 0.5 and r.train.epochs == 3 and r.rule.estimator == "symmetric"
    assert r.model.hidden == [8, 4] and r.optim.lr == 0.1


def test_override_switches_kind_and_its_keys(tmp_path):
    r = load_recipe(write(tmp_path, GOOD.replace("  T: 8\n  K: 4\n  beta: 0.2\n", "")), ["rule.kind=bp"])
    assert r.rule.kind == "bp"


def test_bad_override_names_the_override(tmp_path):
    path = write(tmp_path, GOOD)
    with pytest.raises(RecipeError, match=r"override 'rule.T=abc': rule.T: expected an integer"):
        load_recipe(path, ["rule.T=abc"])
    with pytest.raises(RecipeError, match=r"override 'rule.betta=1': rule.betta: unknown key; did you mean 'beta'"):
        load_recipe(path, ["rule.betta=1"])
    with pytest.raises(RecipeError, match="expected KEY.PATH=VALUE"):
        load_recipe(path, ["rule.beta"])


def test_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")


def test_resolved_yaml_round_trips(tmp_path):
    r = load_recipe(write(tmp_path, GOOD), ["rule.estimator=random-sign"])
    text = to_yaml(r)
    again = from_plain(yaml.safe_load(text))
    assert again == r
    assert to_yaml(again) == text


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    r = load_recipe(write(tmp_path, GOOD.replace("lr: [0.01, 0.005]", "lr: [1e-2, 5e-3]")), ["rule.beta=1e-1"])
    assert r.optim.lr == [0.01, 0.005] and r.rule.beta == 0.1
    assert "rule.T: expected an integer, got '1e3'" in error_of(tmp_path, GOOD.replace("T: 8", "T: 1e3"))


@pytest.mark.parametrize("kind", ["mlp", "energy_mlp", "vf_mlp", "ff_mlp"])
def test_dense_chains_check_their_sizes_and_scales_alike(kind):
    """Every fully connected net checks ``hidden`` and ``weight_scale`` with the same words."""
    from eprun.nets import NETWORKS

    config = NETWORKS[kind].Config

    def problems(**keys):
        return dict(config(kind=kind, **keys).check())

    assert problems(hidden=[8, 4], weight_scale=[1.0, 0.5, 2.0]) == {}
    assert problems(hidden=[]).get("hidden", "").startswith("needs at least one hidden layer size, e.g. [")
    assert problems(hidden=[0])["hidden"].startswith("must be between 1 and")
    assert problems(hidden=[8, 4], weight_scale=[1.0, 0.5])["weight_scale"] == (
        "a list needs one entry per weight layer (3 for hidden=[8, 4]), got 2")
