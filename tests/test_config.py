"""Config errors name the file, the key and the allowed values."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from shared.config import load_experiment, load_site
from shared.errors import ConfigError
from shared.synth.config import load_cohort
from tests.conftest import ROOT


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return p


def test_shipped_configs_validate() -> None:
    exp = load_experiment(ROOT / "configs" / "experiment.yaml")
    assert exp.privacy.target_epsilon == 8.0 and exp.federation.rounds >= 1
    assert len(load_cohort(ROOT / "configs" / "cohort.yaml").hospitals) == 3
    site = load_site(ROOT / "configs" / "site.yaml")
    assert site.manifest.is_absolute()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: x\nprivacy: {accountant: gdp}\n", r"exp.yaml: `privacy.accountant` is 'gdp'; allowed values are 'rdp', 'prv'"),
        ("name: x\nprivacy: {target_epsilon: -1}\n", r"`privacy.target_epsilon` is -1.0; it must be > 0"),
        ("name: x\nfederation: {rounds: three}\n", r"`federation.rounds` must be an integer, got 'three'"),
        ("name: x\ntraining: {lr: 0.1}\n", r"unknown key\(s\) 'lr' in `training`; allowed keys are .*learning_rate"),
        ("seed: 1\n", r"required key `name` is missing"),
        ("name: x\nmodel: {name: transformer9000}\n", r"exp.yaml: `model.name` is 'transformer9000'; allowed values are 'speech_language', 'prosody_mel'"),
        ("name: x\nmodel: {conv_channels: 10, groups: 4}\n", r"`model.conv_channels` \(10\) must be divisible by `model.groups` \(4\)"),
        ("name: [x\n", r"exp.yaml is not valid YAML at line 2, column 1"),
        ("name: x\nprivacy:\n  target_epsilon: 3\nseed: 1\nprivacy:\n  enabled: true\n",
         r"exp.yaml: key 'privacy' appears twice in the same section \(lines 2 and 5\); YAML would silently keep only the second"),
        ("name: x\nfederation:\n  rounds: 3\n  rounds: 30\n", r"exp.yaml: key 'rounds' appears twice in the same section \(lines 3 and 4\)"),
        ("name: x\nseed: 18446744073709551616\n", r"exp.yaml: `seed` is 18446744073709551616; it must be <= 9223372036854775807"),  # torch refused it at every round
        ("name: x\nseed: -1\n", r"exp.yaml: `seed` is -1; it must be >= 0"),  # torch reads -1 as 2**64 - 1
        ("name: " + "n" * 101 + "\n", r"exp.yaml: `name` is 101 characters long; it must be at most 100 printable characters, because it starts every run id"),
        ("name: x\ntraining: {learning_rate: 1" + "0" * 400 + "}\n", r"exp.yaml: `training.learning_rate` is an integer of 401 digits, too large"),  # was OverflowError
        ("name: x\nfeatures: {max_seconds: .inf}\n", r"exp.yaml: `features.max_seconds` is inf; it must be a finite number"),  # `plan` failed with OverflowError
        ("name: x\nfederation: {round_timeout_s: .inf}\n", r"exp.yaml: `federation.round_timeout_s` is inf; it must be a finite number"),
        ('name: "relapse\\nstudy"\n', r"exp.yaml: `name` holds a control or line-break character; it must be at most 100 printable characters"),
    ],
)
def test_bad_experiment_yaml_is_a_clear_config_error(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message):
        load_experiment(path)


def test_missing_config_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_experiment(tmp_path / "nope.yaml")


def test_configs_are_frozen() -> None:
    exp = load_experiment(ROOT / "configs" / "experiment.yaml")
    with pytest.raises(AttributeError):
        exp.privacy.target_epsilon = 100  # type: ignore[misc]


def test_duplicate_keys_are_refused_in_site_yaml_and_in_a_plan_sent_as_text(tmp_path: Path) -> None:
    from shared.config import experiment_from_yaml_text

    site = tmp_path / "site.yaml"
    site.write_text("name: oslo\nmanifest: m.csv\npolicy:\n  epsilon_cap_total: 5\n  epsilon_cap_total: 50\n")
    with pytest.raises(ConfigError, match=rf"Config file {site}: key 'epsilon_cap_total' appears twice in the same section \(lines 4 and 5\)"):
        load_site(site)
    with pytest.raises(ConfigError, match=r"the plan: key 'name' appears twice in the same section \(lines 1 and 2\)"):
        experiment_from_yaml_text("name: a\nname: b\n", source="the plan")


def test_a_yaml_merge_key_overridden_by_an_explicit_key_is_not_a_duplicate(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\nfederation:\n  <<: {rounds: 3, min_nodes: 2}\n  rounds: 4\n")
    assert load_experiment(path).federation.rounds == 4


def test_the_model_names_a_config_accepts_are_the_registrys_aliases_included() -> None:
    from shared.config import MODEL_NAMES
    from shared.models import MODELS

    assert set(MODEL_NAMES) == set(MODELS)


def test_features_min_seconds_above_max_seconds_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\nfeatures: {min_seconds: 20, max_seconds: 12}\n")
    with pytest.raises(ConfigError, match=r"exp.yaml: `features.min_seconds` \(20\) is above `features.max_seconds` \(12\)"):
        load_experiment(path)


@pytest.mark.parametrize("delta", ["1.0", "0.05", "0.01"])
def test_a_target_delta_of_0_01_or_more_gets_one_bound_and_one_message(tmp_path: Path, delta: str) -> None:
    path = write(tmp_path, f"name: x\nprivacy: {{target_delta: {delta}}}\n")
    with pytest.raises(ConfigError, match=rf"exp.yaml: `privacy.target_delta` is {float(delta)!r}; it must be < 0.01\.$"):
        load_experiment(path)


@pytest.mark.parametrize("name", ["node-3", "x" * 65, "oslo\tuniversity", " oslo"])
def test_a_site_name_the_coordinator_would_reject_is_refused_when_site_yaml_is_read(tmp_path: Path, name: str) -> None:
    from shared.config import load_site

    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump({"name": name, "manifest": "manifest.csv"}))
    with pytest.raises(ConfigError, match=r"site\.yaml: field 'name'"):
        load_site(path)


def test_exponent_floats_without_a_dot_as_the_runbooks_write_them_are_numbers(tmp_path: Path) -> None:
    """PyYAML (YAML 1.1) reads `1e-5` as text; configs read it as YAML 1.2 and JSON do."""
    shipped = (ROOT / "configs" / "experiment.yaml").read_text()
    assert "target_delta: 1.0e-5" in shipped
    exp = load_experiment(write(tmp_path, shipped.replace("target_delta: 1.0e-5", "target_delta: 1e-5")))
    assert exp.privacy.target_delta == 1e-5 and type(exp.privacy.target_delta) is float
    assert exp.plan_hash() == load_experiment(ROOT / "configs" / "experiment.yaml").plan_hash()  # same plan, same hash
    assert type(exp.federation.rounds) is int  # plain integers are still integers
    site = tmp_path / "site.yaml"
    site.write_text("name: oslo\nmanifest: manifest.csv\npolicy: {delta: 1e-6, epsilon_cap_total: 3E1}\n")
    policy = load_site(site).policy
    assert (policy.delta, policy.epsilon_cap_total) == (1e-6, 30.0) and type(policy.delta) is float
    named = load_experiment(write(tmp_path, "name: 1e5\n"))  # a text field that looks like a number keeps its text
    assert named.name == "1e5"
    from shared.schema import load_yaml

    assert yaml.safe_load(yaml.safe_dump(load_yaml(site))) == {"name": "oslo", "manifest": "manifest.csv", "policy": {"delta": 1e-6, "epsilon_cap_total": 30.0}}  # a raw mapping written back (bench)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("'1e-5'", r"`privacy.target_delta` must be a number, got the quoted text '1e-5'; remove the quotes so YAML reads it as a number\.$"),
        ("1e-5x", r"`privacy.target_delta` must be a number, got '1e-5x' \(str\)\.$"),
        ("'.inf'", r"`privacy.target_delta` must be a number, got '.inf' \(str\)\.$"),
        ("1e999", r"`privacy.target_delta` is inf; it must be < 0.01\.$"),
    ],
)
def test_a_quoted_or_malformed_number_is_still_refused(tmp_path: Path, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_experiment(write(tmp_path, f"name: x\nprivacy: {{target_delta: {value}}}\n"))


def test_an_integer_field_given_an_exponent_float_is_refused_naming_it_as_written(tmp_path: Path) -> None:
    """The error shows `5e0` as the researcher wrote it (it said 5.0 (float), a value not in the file)."""
    with pytest.raises(ConfigError, match=r"`federation.rounds` must be an integer, got 5e0 \(a number with an exponent, read as 5.0\)\.$"):
        load_experiment(write(tmp_path, "name: x\nfederation: {rounds: 5e0}\n"))



@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: x\nfederation: {1e1: 3}\n", r"unknown key\(s\) 1e1 \(read as 10.0\) in `federation`; allowed keys are "),
        ("name: x\n1e1: 3\nfoo: 1\n", r"unknown key\(s\) 'foo', 1e1 \(read as 10.0\) in the top level; "),  # text and number keys together: was a TypeError from sorting them
        ("name: x\nprivacy:\n  10.0: 1\n  1e1: 2\n", r"key 1e1 \(read as 10.0\) appears twice in the same section \(lines 3 and 4\)"),
    ],
)
def test_an_exponent_literal_used_as_a_key_is_named_as_written(tmp_path: Path, text: str, message: str) -> None:
    """A key `1e1:` was named 10.0, a key not in the file (as values were before: see above)."""
    with pytest.raises(ConfigError, match=message):
        load_experiment(write(tmp_path, text))

def test_the_largest_seed_a_plan_accepts_seeds_the_model(tmp_path: Path) -> None:
    from shared.models import build_model

    exp = load_experiment(write(tmp_path, f"name: x\nseed: {2**63 - 1}\n"))
    assert exp.seed == 2**63 - 1
    build_model(exp)  # torch.manual_seed accepts it


def _alias_bomb(levels: int) -> str:
    """A YAML value of 9**levels strings written in a few hundred bytes (each level repeats the last nine times)."""
    parts = ["&a0 [" + ", ".join(["xxxxxxxxxxxxxxxx"] * 9) + "]"]
    parts += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "[" + ", ".join(parts) + "]"


def test_a_value_of_the_wrong_type_is_shown_shortened_in_the_error(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text("name: [" + ", ".join(["patient-0001"] * 5000) + "]\nmanifest: m.csv\n")
    with pytest.raises(ConfigError, match=r"site.yaml: `name` must be text, got \['patient-0001', .*\.\.\..* \(list\)\.$") as err:
        load_site(path)
    assert len(str(err.value)) < 400


@pytest.mark.parametrize("where", ["site", "plan"])
def test_a_yaml_alias_bomb_is_refused_naming_the_file_before_it_is_expanded(tmp_path: Path, where: str) -> None:
    from shared.config import experiment_from_yaml_text

    text = f"name: {_alias_bomb(6)}\n"  # 531441 values from 300 bytes, where text belongs
    path = tmp_path / "site.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"aliases \(\*name\) expand to more than 10000 values") as err:
        load_site(path) if where == "site" else experiment_from_yaml_text(text, source="the plan")
    assert str(err.value).startswith(f"Config file {path}:" if where == "site" else "the plan:")
    assert len(str(err.value)) < 400


def test_yaml_aliases_that_repeat_a_section_a_few_times_are_still_read(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\nlanguage: &l {}\nfederation: &f {rounds: 3}\nx-copy: [*f, *f, *f]\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'x-copy'"):  # read, then refused for what it is, not for its aliases
        load_experiment(path)


@pytest.mark.parametrize("cap", ["epsilon_cap_total", "epsilon_cap_run"])
def test_an_infinite_epsilon_cap_in_site_yaml_is_refused_as_no_cap_at_all(tmp_path: Path, cap: str) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(f"name: oslo\nmanifest: m.csv\npolicy:\n  {cap}: .inf\n")
    with pytest.raises(ConfigError, match=rf"site.yaml: `policy.{cap}` is inf; it must be a finite ε \(e.g. 10\)"):
        load_site(path)


def _uncommented_leaf_keys(path: Path) -> list[str]:
    """Leaf keys of a YAML file with no comment on their line or on the line above.

    A key inside a one-line flow mapping that is an item of a list (``hospitals``) may instead be
    explained in the comment lines right above the list. The file's leading comment block (its
    header) does not count as a field's comment.
    """
    lines = path.read_text().splitlines()
    header = 0
    while header < len(lines) and lines[header].lstrip().startswith("#"):
        header += 1

    def comment_only(i: int) -> bool:
        return header <= i < len(lines) and lines[i].lstrip().startswith("#")

    def block_above(i: int) -> str:
        out = []
        while comment_only(i - 1):
            i -= 1
            out.append(lines[i])
        return "\n".join(out)

    missing: list[str] = []

    def walk(node: yaml.Node, where: str, list_line: int | None) -> None:
        if isinstance(node, yaml.SequenceNode):
            for item in node.value:
                walk(item, where + "[]", node.start_mark.line)
        elif isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                name = f"{where}.{key.value}" if where else key.value
                if not isinstance(value, yaml.ScalarNode):
                    walk(value, name, None)
                    continue
                line = key.start_mark.line
                rest = lines[value.end_mark.line][value.end_mark.column :].strip()
                trailing = rest.startswith("#") if not node.flow_style else "#" in rest
                above = not node.flow_style and comment_only(line - 1)
                listed = node.flow_style and list_line is not None and f"{key.value}:" in block_above(list_line)
                if not (trailing or above or listed):
                    missing.append(f"{path.name}:{line + 1} {name}")

    root = yaml.compose(path.read_text())
    assert root is not None, f"{path.name} is empty"
    walk(root, "", None)
    return missing


@pytest.mark.parametrize("name", ["experiment.yaml", "cohort.yaml"])
def test_shipped_configs_comment_every_field(name: str) -> None:
    """The runbook says the shipped experiment and cohort files have a comment on every field."""
    assert _uncommented_leaf_keys(ROOT / "configs" / name) == []


def test_comment_check_finds_an_uncommented_field(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(
        "# header\nname: x\nseed: 1  # a seed\nmodel:\n  # the width\n  hidden: 3\n  dropout: 0.0\n"
        "hospitals:\n  # name: the site\n  - {name: a, n: 2}\n"
    )
    assert _uncommented_leaf_keys(p) == ["c.yaml:2 name", "c.yaml:7 model.dropout", "c.yaml:10 hospitals[].n"]
