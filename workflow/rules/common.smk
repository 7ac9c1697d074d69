# Shared by the stage files: the validated config, the plan of what to build (imatch.plan: the
# decisions and paths, unit-tested), the shell prefix, code() dependencies, the inputs of scoring
# and gathering jobs (main and ablation models alike), wildcard constraints, default targets.
import ast
import json
import os
import re
import sys
from pathlib import Path

from snakemake.utils import validate

validate(config, schema="../schemas/config.schema.yaml")

RESULTS = config["results"]
# importable: the Snakefile put its parent on sys.path
PACKAGE = Path(workflow.basedir) / "workflow" / "imatch"
import yaml  # noqa: E402
from imatch import config_checks  # noqa: E402
from imatch.plan import Plan  # noqa: E402

# what the schema cannot say (names that must exist, per-backbone overrides, input files), checked
# now: on a finished results tree nothing else would look at them
config_checks.check(
    config,
    yaml.safe_load((PACKAGE.parent / "schemas" / "config.schema.yaml").read_text()),
    Path.cwd(),
)
PLAN = Plan(config)
BACKBONES = PLAN.backbones
BASELINES = config_checks.BASELINES
ABLATION = config["ablation"]

# Rules run the package from this checkout: with --sdm conda in the env of envs/imatch.yaml,
# otherwise with the Python that runs Snakemake (no need to activate the venv).
# Shell commands call `imatch <command>` exactly as a user would on the command line. The package
# goes before the user's PYTHONPATH, which is kept (a cluster's modules or a --target install).
_USES_CONDA = "conda" in {
    str(m).lower() for m in workflow.deployment_settings.deployment_method
}
_PYTHON = "python" if _USES_CONDA else sys.executable
# (Snakemake formats the prefix like a shell command, hence the doubled braces.)
shell.prefix(
    f"set -euo pipefail; export PYTHONPATH={PACKAGE.parent}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; "
    f'imatch() {{{{ {_PYTHON} -m imatch "$@"; }}}}; '
)


wildcard_constraints:
    split="train|holdout|val|test",
    query="(overall|element)-[0-9a-f]{8}",  # instruction sets: hashes of their settings (imatch/variants.py)
    train="[0-9a-f]{8}",
    aug="[0-9a-f]{8}",
    backbone="|".join(map(re.escape, BACKBONES)) or "(?!)",
    task="overall|element",
    round="r[0-9]+",
    levels="r[0-9]+(-blank)?",
    baseline="|".join(BASELINES),
    predictor="|".join(map(re.escape, [*BASELINES, *PLAN.model_predictors])),
    model_predictor="|".join(map(re.escape, PLAN.model_predictors)),
    view="seen|blank",
    shard="[0-9]+",
    variant=r"(overall|element)-[0-9a-f]{8}\.[0-9a-f]{8}(\.seed[0-9]+)?",  # ablation: + its seed


def _module_file(name):
    """Source file of `imatch.<name>` (dotted), or None when it is not part of the package."""
    path = PACKAGE.joinpath(*name.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def code(module):
    """The stage module and the package modules it imports: editing any of them reruns the stage.

    Architectures load lazily (`imatch.archs.get`): rules that use one add `arch_code`.
    """
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.split(".")[0] == "imatch"
            ):
                base = node.module.partition(".")[2]
                todo.append(base) if base else None
                todo.extend(f"{base}.{a.name}" if base else a.name for a in node.names)
    # relative to the working directory: a results tree moved with its checkout stays up to date
    return sorted(os.path.relpath(_module_file(name)) for name in seen)


def arch_code(wildcards):
    """The code of the rule's backbone architecture (loaded lazily, so `code` cannot see it)."""
    arch = BACKBONES[wildcards.backbone]["arch"]
    files = code(f"archs.{arch}")
    plugin = PACKAGE / "archs" / f"{arch}_swift.py"
    return sorted({*files, *code(f"archs.{arch}_swift")}) if plugin.is_file() else files


def backbone_value(key):
    """A param function returning one setting of the rule's backbone."""

    def value(wildcards):
        return BACKBONES[wildcards.backbone][key]

    return value


def output_dir(wildcards, output):
    """The folder of a rule's first output, for commands that take a folder."""
    return str(Path(output[0]).parent)


def input_dir(wildcards, input):
    """The folder of a rule's first input."""
    return str(Path(input[0]).parent)


def scoring_job_inputs(wildcards, model, sets):
    """Inputs of a scoring job (main or ablation model): the model, its backbone, the code, the sets."""
    return {
        "model": model,
        "backbone": PLAN.backbone_input(wildcards.backbone),
        "code": code("score"),
        "arch": arch_code(wildcards),
        **sets,
    }


def gather_job_inputs(folder, sets):
    """Inputs of gathering one model's score shards from `folder`/shards/."""
    return {"shards": PLAN.shards(folder), "code": code("score"), **sets}
