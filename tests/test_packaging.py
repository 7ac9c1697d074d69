"""What a user installs and configures: CLI help, pins, schema completeness, atomic writes."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator

from imatch.atomic import atomic_path
from imatch.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
COMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    proc = subprocess.run([sys.executable, "-m", "imatch", command, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "usage: imatch " + command in proc.stdout


@pytest.mark.parametrize("command", ["score", "export", "check-config", "audit"])
def test_every_flag_of_the_user_facing_commands_says_what_it_does(command):
    """`imatch score --device/--dtype/--batch-size/--tau` had no help; a T2I user reads these first."""
    parser = build_parser()._subparsers._group_actions[0].choices[command]
    silent = [a.option_strings or a.dest for a in parser._actions if a.dest != "help" and not a.help]
    assert silent == [], silent


def _properties(schema, path=""):
    for name, sub in schema.get("properties", {}).items():
        yield f"{path}{name}", sub
        yield from _properties(sub, f"{path}{name}.")


@pytest.mark.parametrize("key, sub", list(_properties(SCHEMA)), ids=[k for k, _ in _properties(SCHEMA)])
def test_every_config_key_has_description_and_default(key, sub):
    assert sub.get("description"), key
    assert "default" in sub, key
    Draft202012Validator(sub).validate(sub["default"])


@pytest.mark.parametrize("name", ["config.yaml", "evalmuse.yaml"])
def test_shipped_configs_validate(name):
    Draft202012Validator(SCHEMA).validate(yaml.safe_load((REPO / "config" / name).read_text()))


def test_conda_env_pins_equal_pyproject():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((REPO / "envs" / "imatch.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert sorted(pip) == sorted(d for d in deps if not d.startswith("snakemake"))
    assert all("==" in d for d in deps)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.parquet"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole" and list(tmp_path.iterdir()) == [target]


def test_snakefiles_are_formatted():
    snakefmt = Path(sys.executable).with_name("snakefmt")
    proc = subprocess.run([str(snakefmt), "--check", "Snakefile", "workflow/rules"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
