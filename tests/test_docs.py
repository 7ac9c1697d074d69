"""The documentation says what the code does: the config's key reference is the schema's (generated,
and current), the stage table and the rule graph are the workflow's rules, links lead somewhere,
and the README's test command is the one CI runs."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCHEMA_FILE = REPO / "workflow" / "schemas" / "config.schema.yaml"
CONFIG_README = REPO / "config" / "README.md"
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
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


STAGES = REPO / "docs" / "stages.md"


def stage_rows() -> dict[str, str]:
    """rule -> command cell of the table in docs/stages.md."""
    rows = {}
    for line in STAGES.read_text().splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 4 and re.fullmatch(r"`\w+`", cells[1]):
            assert cells[1].strip("`") not in rows, f"{cells[1]} has two rows"
            rows[cells[1].strip("`")] = cells[2]
    return rows


def snakemake_here(*args: str) -> str:
    proc = subprocess.run([str(SNAKEMAKE), *args], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_the_stage_table_has_one_row_per_rule_snakemake_knows():
    rules = set(snakemake_here("--list-rules").split())
    assert {"train", "score", "instructions_eval_levels", "all"} <= rules
    assert set(stage_rows()) == rules


def test_each_stage_row_names_the_command_its_rule_runs():
    """Each rule's shell command, as Snakemake parsed it, runs the `imatch` command of its row."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import OutputSettings, ResourceSettings

    with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
        workflow = api.workflow(resource_settings=ResourceSettings(), snakefile=REPO / "Snakefile", workdir=REPO)
        shell = {rule.name: " ".join((rule.shellcmd or "").split()) for rule in workflow._workflow.rules}
    wrong = {}
    for rule, cell in stage_rows().items():
        # `imatch plots scatter`: a sub-subcommand is a word; `imatch score-set --shard K`: flags are not
        named = re.match(r"`imatch ([a-z0-9-]+(?: [a-z]+)?)", cell)
        runs = named is None and not shell.get(rule) or named is not None and re.search(
            r"(^|[\s;])imatch " + re.escape(named.group(1)) + r"(\s|$)", shell.get(rule, ""))
        if not runs:
            wrong[rule] = (cell, shell.get(rule, "(no such rule)")[:100])
    assert not wrong, wrong


def _svg_graph(svg: str) -> tuple[set, set]:
    nodes = {m.group(1): html.unescape(m.group(2)) for m in re.finditer(
        r'class="node">\s*<title>(\d+)</title>.*?<text[^>]*>([^<]+)</text>', svg, re.S)}
    edges = {tuple(nodes[i] for i in html.unescape(m.group(1)).split("->")) for m in re.finditer(
        r'class="edge">\s*<title>([^<]+)</title>', svg)}
    return set(nodes.values()), edges


def _dot_graph(dot: str) -> tuple[set, set]:
    nodes = dict(re.findall(r'^\s*(\d+)\[label = "([^"]+)"', dot, re.M))
    edges = {(nodes[a], nodes[b]) for a, b in re.findall(r"^\s*(\d+) -> (\d+)", dot, re.M)}
    return set(nodes.values()), edges


def test_the_readme_rule_graph_is_the_workflow_s():
    """docs/rulegraph.svg (made with graphviz, which the test does not need) has the rules and edges
    of `snakemake --rulegraph` of the embedded default; the README says how to remake it."""
    pictured = _svg_graph((REPO / "docs" / "rulegraph.svg").read_text())
    now = _dot_graph(snakemake_here("--rulegraph"))
    assert len(now[0]) > 20 and len(now[1]) > 30
    assert pictured == now, ("stale docs/rulegraph.svg: rules", pictured[0] ^ now[0], "edges", pictured[1] ^ now[1])
    assert "snakemake --rulegraph | dot -Tsvg > docs/rulegraph.svg" in (REPO / "README.md").read_text()


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz not installed (only checks the parser)")
def test_the_svg_parser_reads_what_dot_writes():
    dot = 'digraph g {\n  0[label = "all"];\n  1[label = "a_b"];\n  2[label = "c"];\n  1 -> 0\n  2 -> 1\n}\n'
    svg = subprocess.run(["dot", "-Tsvg"], input=dot, capture_output=True, text=True, check=True).stdout
    assert _svg_graph(svg) == _dot_graph(dot) == ({"all", "a_b", "c"}, {("a_b", "all"), ("c", "a_b")})


def test_the_readme_test_command_is_what_ci_runs():
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)
    assert "make test   # the whole test suite (the same command CI runs)" in (REPO / "README.md").read_text()


@pytest.mark.parametrize("doc", ["README.md", "config/README.md", "docs/stages.md"])
def test_relative_links_lead_to_files_and_headings_that_exist(doc):
    text = (REPO / doc).read_text()
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (REPO / doc).parent / path if path else REPO / doc
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md":
            slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                     for h in re.findall(r"^#+ (.+)$", file.read_text(), re.M)}
            if anchor not in slugs:
                broken.append(target)
    assert not broken
