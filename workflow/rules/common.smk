# Config validation and the input functions shared by all rules (no rules here).
import ast
import re
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
    return sorted(str(_module_file(name)) for name in seen)


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
    for name in BACKBONES:
        for task in ("overall", "element"):
            targets.append(f"{RESULTS}/models/{name}/{task}-{ROUND}")
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
    elif "round" in wildcards.keys():
        inputs["element_levels"] = (
            f"{RESULTS}/element_levels/{wildcards.round}/{split}.parquet"
        )
    elif VARIANTS.uses_element_levels(wildcards.query):
        raise ValueError(
            f"{wildcards.query} states element levels: its {split} set needs a round"
        )
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


# ---- backbones, fine-tuning and scoring ------------------------------------------------------
BACKBONES = {b["name"]: b for b in config["backbones"]}
if len(BACKBONES) != len(config["backbones"]) or "prior" in BACKBONES:
    raise ValueError("config: backbone names must be unique and must not be 'prior'")
ROUND = "r1"


wildcard_constraints:
    backbone="|".join(map(re.escape, BACKBONES)) or "(?!)",
    task="overall|element",
    round="r[0-9]+",


def backbone_dir(name):
    """Folder of a backbone in the native transformers layout."""
    b = BACKBONES[name]
    if b["source"] == "tiny":
        return f"{RESULTS}/backbones/{name}"
    if b["source"] == "local":
        return b["checkpoint"]
    suffix = "-native" if b["arch"] == "ovis2" else ""
    return f"resources/backbones/{name}{suffix}"


def backbone_input(wildcards):
    """What makes a fine-tune stale: the built folder, or the download's manifest."""
    b = BACKBONES[wildcards.backbone]
    if b["source"] == "hub" and b["arch"] != "ovis2":
        return f"resources/backbones/{wildcards.backbone}/manifest.json"
    return backbone_dir(wildcards.backbone)


def backbone_value(key):
    """A param function returning one setting of the rule's backbone."""

    def value(wildcards):
        return BACKBONES[wildcards.backbone][key]

    return value


def arch_code(wildcards):
    """The code of the rule's backbone architecture (loaded lazily, so `code` cannot see it)."""
    arch = BACKBONES[wildcards.backbone]["arch"]
    files = code(f"archs.{arch}")
    plugin = PACKAGE / "archs" / f"{arch}_swift.py"
    return sorted({*files, *code(f"archs.{arch}_swift")}) if plugin.is_file() else files


def backbone_folder(wildcards):
    return backbone_dir(wildcards.backbone)


def recipe_flags(wildcards):
    r = {**config["train"], **BACKBONES[wildcards.backbone]["recipe"]}
    flags = []
    for key, value in sorted(r.items()):
        opt = f"--{key.replace('_', '-')}"
        if isinstance(value, bool):
            flags.append(opt if value else f"--no-{opt[2:]}")
        elif isinstance(value, list):
            flags.append(f"{opt} {' '.join(value)}" if value else "")
        else:
            flags.append(f"{opt} {value}")
    return " ".join(f for f in flags if f)


def score_settings(name):
    return {**config["score"], **BACKBONES[name]["scoring"]}


def score_flags(wildcards):
    s = score_settings(wildcards.backbone)
    r = {**config["train"], **BACKBONES[wildcards.backbone]["recipe"]}
    return (
        f"--batch-size {s['batch_size']} --dtype {s['dtype']} --device {s['device']}"
        f" --tau {s['tau']} --max-pixels {r['max_pixels']}"
    )


def gpus():
    return config["resources"]["gpus"]


def training_set(wildcards):
    return instruction_set(wildcards.task, "train").replace(".parquet", ".jsonl")


def scoring_set(wildcards):
    """The instruction set a model scores: overall queries state the element levels predicted
    by this round's element models when element augmentation is on."""
    path = instruction_set(wildcards.task, wildcards.split)
    if wildcards.task == "overall" and VARIANTS.uses_element_levels(
        VARIANTS.add("overall", config["instructions"])[0]
    ):
        path = path.replace(".parquet", f".levels-{wildcards.round}.parquet")
    return path


def level_backbones():
    names = config["element_levels"]["from"] or list(BACKBONES)
    unknown = set(names) - set(BACKBONES)
    if unknown:
        raise ValueError(
            f"config: element_levels.from names unknown backbones {sorted(unknown)}"
        )
    return names


def element_level_scores(wildcards):
    return [
        f"{RESULTS}/scores/{name}/element-{wildcards.round}/{wildcards.split}.parquet"
        for name in level_backbones()
    ]


def input_dir(wildcards, input):
    return str(Path(input[0]).parent)


def scratch_dir(wildcards):
    """Trainer checkpoints live outside the declared output, so Snakemake never deletes them
    before a rerun and a killed job resumes."""
    return f"{RESULTS}/scratch/{wildcards.backbone}/{wildcards.task}-{wildcards.round}"


def tau_of(wildcards):
    return score_settings(wildcards.backbone)["tau"]


def predictors():
    names = config["evaluate"]["predictors"]
    unknown = set(names) - {"prior", *BACKBONES}
    if unknown:
        raise ValueError(
            f"config: evaluate.predictors names unknown predictors {sorted(unknown)}"
        )
    return names
