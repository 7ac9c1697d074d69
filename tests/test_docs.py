"""The documentation says what the code does: the config's key reference is the schema's (generated,
and current)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SCHEMA_FILE = REPO / "workflow" / "schemas" / "config.schema.yaml"
CONFIG_README = REPO / "config" / "README.md"
BEGIN, END = "<!-- BEGIN imatch config-docs -->", "<!-- END imatch config-docs -->"


def config_docs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imatch", "config-docs", *args], cwd=REPO,
                          capture_output=True, text=True)


def test_the_config_key_reference_is_what_the_schema_gives():
    """Fails after a schema edit until `imatch config-docs` has rewritten config/README.md."""
    proc = config_docs("--check")
    assert proc.returncode == 0, proc.stderr


def test_a_stale_key_reference_is_named_and_fixed(tmp_path):
    stale = tmp_path / "README.md"
    current = CONFIG_README.read_text()
    stale.write_text(current.replace("- `train.seed`", "- `train.seed_of_old`", 1))
    proc = config_docs("--check", "--readme", str(stale))
    assert proc.returncode == 1 and "key reference" in proc.stderr and "out of date" in proc.stderr
    assert "imatch config-docs" in proc.stderr  # says how to fix it
    assert config_docs("--readme", str(stale)).returncode == 0
    assert stale.read_text() == current
    assert not list(tmp_path.glob("*.prov.json"))  # a docs command leaves no provenance record beside docs
    stale.write_text("# no markers\n")
    proc = config_docs("--readme", str(stale))
    assert proc.returncode == 2 and "BEGIN imatch config-docs" in proc.stderr
    assert stale.read_text() == "# no markers\n"


def _schema_keys(schema: dict, prefix: str = ""):
    """Every key path of the schema, read here without the generator's code: `a.b`, `list[].key`."""
    for name, sub in schema.get("properties", {}).items():
        yield f"{prefix}{name}", sub
        yield from _schema_keys(sub, f"{prefix}{name}.")
        if "properties" in sub.get("items", {}):
            yield from _schema_keys(sub["items"], f"{prefix}{name}[].")


def test_every_schema_key_is_in_the_reference_with_its_default_and_description():
    schema = yaml.safe_load(SCHEMA_FILE.read_text())
    section = CONFIG_README.read_text().split(BEGIN, 1)[1].split(END, 1)[0]
    lines = {m.group(1): m.group(0) for m in re.finditer(r"^- `([^`]+)` .*$", section, re.M)}
    keys = dict(_schema_keys(schema))
    assert len(keys) > 100 and "backbones[].tasks" in keys and "ablation.element[].prompt_type" in keys
    assert sorted(lines) == sorted(keys)  # no key left out, none that the schema no longer has
    for key, sub in keys.items():
        text = " ".join(lines[key].split())
        if "default" in sub:
            assert f"default `{json.dumps(sub['default'], ensure_ascii=False)}`" in text, key
        assert sub.get("description") and " ".join(sub["description"].split()) in text, key
        for allowed in sub.get("enum", []):
            assert json.dumps(allowed) in text, key
