"""Config errors the schema cannot see, found when Snakemake parses the config (imatch.config_checks)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator

from imatch.config_checks import ConfigError, check, check_writable, predictor_names, with_defaults

REPO = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())


def _with_defaults(config: dict) -> dict:
    """The config as Snakemake's validate(set_default=True) leaves it."""
    return with_defaults(config, SCHEMA)


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
    # ovis2-34b trains its overall model only (tasks: [overall]): named where element models are used
    (lambda c: c["ensemble"].update(element=["ovis2-8b", "ovis2-34b"]),
     "ensemble.element: ['ovis2-34b'] train(s) no element model (backbones[ovis2-34b].tasks: ['overall'])"),
    (lambda c: c["element_levels"].update({"from": ["ovis2-34b"]}), "element_levels.from: ['ovis2-34b'] train(s) no element"),
    (lambda c: c["pseudo_labels"].update({"from": ["ovis2-8b", "ovis2-34b"], "element_from": None}),
     "pseudo_labels.from (element_from: null): ['ovis2-34b'] train(s) no element"),
    (lambda c: c["evaluate"].update(predictors=["ensemble", "blank-ovis2-34b"]),
     "evaluate.predictors / submission.predictor: ['ovis2-34b'] train(s) no element"),
    (lambda c: c["backbones"][0].update(tasks=["element"]), "ensemble.overall: ['internvl2_5-8b-mpo'] train(s) no overall"),
    # a backbone that splits its layers needs two GPUs or more
    (lambda c: c["backbones"][4].update(recipe={"split_layers": True}), "backbones[ovis2-34b].recipe.split_layers: splitting the layers needs "
     "gpus >= 2, the backbone has 1"),
    (lambda c: c["train"].update(split_layers=True), "backbones[internvl2_5-8b-mpo].(train.split_layers): splitting"),
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


def test_a_read_only_log_folder_is_refused_before_any_job(tmp_path):
    """Snakemake deletes a job's old outputs before it runs; a log it then cannot write cost the
    previous submission.zip. The check runs as the process's effective permissions (root bypasses
    permission bits only with CAP_DAC_OVERRIDE, hence the subprocess without it)."""
    import os
    import subprocess
    import sys

    logs = tmp_path / "results" / "logs" / "submission"
    logs.mkdir(parents=True)
    logs.chmod(0o555)
    drop = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]
    code = ("import sys; from pathlib import Path; from imatch.config_checks import check_writable, ConfigError\n"
            "try:\n    check_writable(Path(sys.argv[1]))\nexcept ConfigError as e:\n    print(e); sys.exit(3)")
    try:
        proc = subprocess.run([*(drop if os.geteuid() == 0 else []), sys.executable, "-c", code, str(tmp_path / "results")],
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "workflow")})
    finally:
        logs.chmod(0o755)
    assert proc.returncode == 3 and f"log folder {logs} is not writable" in proc.stdout, proc.stdout + proc.stderr
    check_writable(tmp_path / "results")  # writable again: nothing to say



def test_check_config_names_the_file_line_and_key(tmp_path, imatch):
    """Snakemake's message for a YAML mistake named neither file nor line; `imatch check-config`
    (and the Snakefile, for config/config.yaml) name both. A schema error names the key."""
    bad = tmp_path / "mine.yaml"
    bad.write_text("ingest:\n  seed: 1\n   holdout_fraction: 0.2\n")
    code, _, err = imatch("check-config", "--workdir", REPO, bad)
    assert code == 2 and f"{bad}: not valid YAML: line 3, column 20: mapping values are not allowed here" in err, err
    bad.write_text("train:\n  lr_scheduler: 3\n")
    code, _, err = imatch("check-config", "--workdir", REPO, bad)
    assert code == 2 and "train.lr_scheduler: 3 is not of type 'string'" in err, err
    bad.write_text("ensemble: {overall: [tiny-ovis3]}\n")
    code, _, err = imatch("check-config", "--workdir", REPO, bad)
    assert code == 2 and "ensemble.overall: unknown backbone(s) ['tiny-ovis3']" in err, err
    code, out, _ = imatch("check-config", "--workdir", REPO, REPO / "config" / "evalmuse.yaml")
    assert code == 0 and "config ok" in out


def test_a_yaml_mistake_in_the_default_config_is_named_by_snakemake(tmp_path):
    import subprocess

    from wfhelpers import SNAKEMAKE, copy_workflow

    wd, _ = copy_workflow(tmp_path / "wf")
    with open(wd / "config" / "config.yaml", "a") as fh:
        fh.write("\nbroken:\n  a: 1\n   b: 2\n")
    lines = (wd / "config" / "config.yaml").read_text().count("\n")
    proc = subprocess.run([str(SNAKEMAKE), "-n", "-d", str(wd), "-s", str(wd / "Snakefile")], capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and f"config/config.yaml: not valid YAML: line {lines}, column 5" in text, text[-2000:]
