"""Config errors the schema cannot see, found when Snakemake parses the config (imatch.config_checks)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator
from jsonschema.validators import extend

from imatch.config_checks import ConfigError, check, predictor_names

REPO = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())


def _with_defaults(config: dict) -> dict:
    """The config as Snakemake's validate(set_default=True) leaves it."""
    def set_defaults(validator, properties, instance, schema):
        for name, sub in properties.items():
            if isinstance(instance, dict) and "default" in sub:
                instance.setdefault(name, copy.deepcopy(sub["default"]))
        yield from Draft202012Validator.VALIDATORS["properties"](validator, properties, instance, schema)

    config = copy.deepcopy(config)
    extend(Draft202012Validator, {"properties": set_defaults})(SCHEMA).validate(config)
    return config


@pytest.fixture
def real():
    return _with_defaults(yaml.safe_load((REPO / "config" / "evalmuse.yaml").read_text()))


def test_the_shipped_configs_pass(real):
    check(real, SCHEMA, REPO)
    check(_with_defaults(yaml.safe_load((REPO / "config" / "config.yaml").read_text())), SCHEMA, REPO)


@pytest.mark.parametrize("edit, key", [
    (lambda c: c["backbones"][0].update(recipe={"learning_rat": 1e-3}), "backbones[internvl2_5-8b-mpo].recipe"),
    (lambda c: c["backbones"][0].update(recipe={"lr": 1e-3}), "unknown key(s) ['lr']"),
    (lambda c: c["backbones"][1].update(scoring={"batch_sise": 4}), "backbones[qwen2_5-vl-7b].scoring"),
    (lambda c: c["backbones"][1].update(scoring={"batch_size": 0}), "batch_size: 0 is less than the minimum"),
    (lambda c: c["backbones"][2].update(recipe={"learning_rate": "fast"}), "learning_rate: 'fast' is not"),
    (lambda c: c["ensemble"].update(overall=["ovis2-8b", "ovis2-9b"]), "ensemble.overall: unknown backbone(s) ['ovis2-9b']"),
    (lambda c: c["pseudo_labels"].update({"from": ["nope"]}), "pseudo_labels.from"),
    (lambda c: c["element_levels"].update({"from": ["nope"]}), "element_levels.from"),
    (lambda c: c["evaluate"].update(predictors=["ensembel"]), "evaluate.predictors"),
    (lambda c: c["submission"].update(predictor="ensembel"), "submission.predictor: unknown predictor 'ensembel'"),
    (lambda c: c["backbones"].append(dict(c["backbones"][0])), "'internvl2_5-8b-mpo' is used twice"),
    (lambda c: c["backbones"][1].update(max_tiles=4), "backbones[qwen2_5-vl-7b].max_tiles"),
    (lambda c: c["data"].update(eval_json="resources/none.json"), "data.eval_json: resources/none.json is not a file"),
    (lambda c: c["data"].update(source="local", local_dir="nowhere"), "data.local_dir: nowhere is not a folder"),
])
def test_each_error_is_named_by_its_key(real, edit, key):
    edit(real)
    with pytest.raises(ConfigError) as caught:
        check(real, SCHEMA, REPO)
    assert key in str(caught.value) and str(caught.value).startswith("config: ")


def test_a_results_folder_with_a_space_is_refused_by_the_schema(real):
    real["results"] = "my results"
    assert list(Draft202012Validator(SCHEMA).iter_errors(real))


def test_predictor_names():
    assert predictor_names(["a"]) == ["prior", "text", "a", "ensemble", "ensemble-r1", "blank-a", "blank-ensemble"]
