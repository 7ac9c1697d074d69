# Config validation and the input functions shared by all rules (no rules here).
import ast
import sys
from pathlib import Path

from snakemake.utils import validate

validate(config, schema="../schemas/config.schema.yaml")

RESULTS = config["results"]
PACKAGE = Path(workflow.basedir) / "workflow" / "imatch"
# Rules run the package from this checkout: with --sdm conda in the env of envs/imatch.yaml,
# otherwise with the Python that runs Snakemake (no need to activate the venv).
# Shell commands call `imatch <command>` exactly as a user would on the command line.
_USES_CONDA = "conda" in {
    str(m).lower() for m in workflow.deployment_settings.deployment_method
}
_PYTHON = "python" if _USES_CONDA else sys.executable
# (Snakemake formats the prefix like a shell command, hence the doubled braces.)
shell.prefix(
    f"set -euo pipefail; export PYTHONPATH={PACKAGE.parent}; "
    f'imatch() {{{{ {_PYTHON} -m imatch "$@"; }}}}; '
)


wildcard_constraints:
    split="train|holdout|val|test",
    predictor="[a-z0-9_-]+",


def code(module):
    """The stage module and the package modules it imports: editing any of them reruns the stage."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen or not (PACKAGE / f"{name}.py").is_file():
            continue
        seen.add(name)
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "imatch":
                    todo.extend(alias.name for alias in node.names)
                elif node.module.startswith("imatch."):
                    todo.append(node.module.split(".", 1)[1])
    return sorted(str(PACKAGE / f"{name}.py") for name in seen)


def source_input():
    """What ingest reads: the demo folder, the download manifest or the user's folder."""
    source = config["data"]["source"]
    if source == "demo":
        return f"{RESULTS}/demo/source"
    if source == "hub":
        return f"{config['hub']['dir']}/manifest.json"
    if not config["data"]["local_dir"]:
        raise ValueError("config: data.source is 'local' but data.local_dir is not set")
    return config["data"]["local_dir"]


def output_dir(wildcards, output):
    """The folder of a rule's first output, for commands that take a folder."""
    return str(Path(output[0]).parent)


def source_dir(wildcards, input):
    return str(
        Path(input.source).parent if config["data"]["source"] == "hub" else input.source
    )


def ingest_inputs(wildcards):
    inputs = {"source": source_input(), "code": code("ingest")}
    for key in ("eval_json", "final_test"):
        if config["data"][key]:
            inputs[key] = config["data"][key]
    return inputs


def ingest_options(wildcards, input):
    """Explicit label/test files when configured; else ingest looks inside the source folder."""
    options = []
    if "eval_json" in input.keys():
        options.append(f"--eval-json {Path(input.eval_json).resolve()}")
    if "final_test" in input.keys():
        options.append(f"--final-test {Path(input.final_test).resolve()}")
    return " ".join(options)


def all_targets():
    targets = [f"{RESULTS}/metrics/summary.tsv", *instruction_targets()]
    sub = config["submission"]
    targets.append(
        f"{RESULTS}/predictions/{sub['predictor']}/{sub['split']}/submission.zip"
    )
    return targets


# ---- instruction sets (names are hashes of their settings: see imatch/variants.py) -----------
sys.path.insert(0, str(PACKAGE.parent))
from imatch.variants import Registry  # noqa: E402

VARIANTS = Registry(config["instructions"])


wildcard_constraints:
    query="(overall|element)-[0-9a-f]{8}",
    train="[0-9a-f]{8}",
    aug="[0-9a-f]{8}",


def available_splits():
    """Splits ingest will produce, known before it runs (the DAG needs them)."""
    splits = ["train", "val"]
    if config["ingest"]["holdout_fraction"] > 0:
        splits.append("holdout")
    data = config["data"]
    if (
        data["final_test"]
        or (data["source"] == "demo" and config["demo"]["test_prompts"] > 0)
        or (
            data["source"] == "local"
            and (Path(data["local_dir"] or ".") / "final_test.json").is_file()
        )
    ):
        splits.append("test")
    return splits


def instruction_set(task, split):
    """Path of the configured instruction set of `task` for `split`."""
    qname, tname = VARIANTS.add(task, config["instructions"])
    name = f"train-{tname}" if split == "train" else split
    return f"{RESULTS}/instructions/{qname}/{name}.parquet"


def instruction_targets():
    """Every set buildable now; overall sets of other splits with element levels need the
    element model's predicted levels (scoring stage) and are requested by it."""
    targets = []
    for task in ("overall", "element"):
        qname, _ = VARIANTS.add(task, config["instructions"])
        for split in available_splits():
            if split == "train" or not VARIANTS.uses_element_levels(qname):
                targets.append(instruction_set(task, split))
    return targets


def instruction_inputs(wildcards):
    inputs = {
        "samples": rules.ingest.output.samples,
        "elements": rules.ingest.output.elements,
        "code": code("instructions"),
    }
    split = wildcards.get("split", "train")
    if split == "train":
        aug = VARIANTS.augmentation_of(wildcards.train)
        if aug is not None:
            inputs["augmented"] = f"{RESULTS}/augment/{aug}/augmented.parquet"
    elif VARIANTS.uses_element_levels(wildcards.query):
        inputs["element_levels"] = f"{RESULTS}/element_levels/{split}.parquet"
    return inputs


def instruction_flags(wildcards, input):
    flags = [VARIANTS.query_flags(wildcards.query)]
    if "train" in wildcards.keys():
        flags.append(VARIANTS.train_flags(wildcards.train))
    if "augmented" in input.keys():
        flags.append(f"--augmented {input.augmented}")
    if VARIANTS.uses_element_levels(wildcards.query):
        levels = (
            input.element_levels if "element_levels" in input.keys() else "ground-truth"
        )
        flags.append(f"--element-levels {levels}")
    return " ".join(f for f in flags if f)


def augment_flags(wildcards):
    return Registry.augment_flags(VARIANTS.augment[wildcards.aug])
