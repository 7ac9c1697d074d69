# Config validation and the input functions shared by all rules (no rules here).
import ast
import copy
import json
import os
import re
import shlex
import sys
from pathlib import Path

from snakemake.utils import validate

validate(config, schema="../schemas/config.schema.yaml")

RESULTS = config["results"]
# importable: the Snakefile put its parent on sys.path
PACKAGE = Path(workflow.basedir) / "workflow" / "imatch"
import yaml  # noqa: E402
from imatch import config_checks  # noqa: E402

# what the schema cannot say (names that must exist, per-backbone overrides, input files), checked
# now: on a finished results tree nothing else would look at them
config_checks.check(
    config,
    yaml.safe_load((PACKAGE.parent / "schemas" / "config.schema.yaml").read_text()),
    Path.cwd(),
)
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
    # relative to the working directory: a results tree moved with its checkout stays up to date
    return sorted(os.path.relpath(_module_file(name)) for name in seen)


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
    if config["ingest"]["skip_bad_records"]:
        options.append("--skip-bad-records")
    return " ".join(options)


def all_targets():
    targets = [f"{RESULTS}/metrics/summary.tsv", *instruction_targets()]
    for name, backbone in BACKBONES.items():
        for task in backbone["tasks"]:
            targets.append(f"{RESULTS}/models/{name}/{task}-{FINAL}")
    for split in config["evaluate"]["splits"]:
        targets += [
            f"{RESULTS}/report/scatter_{split}.png",
            f"{RESULTS}/report/categories_{split}.png",
        ]
    if BACKBONES:
        targets.append(f"{RESULTS}/report/training_curves.png")
    sub = config["submission"]
    targets.append(
        f"{RESULTS}/predictions/{sub['predictor']}/{sub['split']}/submission.zip"
    )
    if sub["predictor"] not in BASELINES and not sub["predictor"].startswith("blank-"):
        targets.append(
            f"{RESULTS}/bundle"
        )  # the submitted models, portable (imatch export)
    return targets + ablation_targets()


# ---- instruction sets (names are hashes of their settings: see imatch/variants.py) -----------
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
    elif "levels" in wildcards.keys():
        inputs["element_levels"] = (
            f"{RESULTS}/element_levels/{wildcards.levels}.parquet"
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
BASELINES = config_checks.BASELINES
FINAL = f"r{config['rounds']}"  # round 2 = trained again on train + pseudo-labelled val


wildcard_constraints:
    backbone="|".join(map(re.escape, BACKBONES)) or "(?!)",
    task="overall|element",
    round="r[0-9]+",
    levels="r[0-9]+(-blank)?",
    baseline="|".join(BASELINES),


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
    """The recipe as `imatch train` flags; keys checked by config_checks, values shell-quoted."""
    r = {**config["train"], **BACKBONES[wildcards.backbone]["recipe"]}
    flags = []
    for key, value in sorted(r.items()):
        opt = f"--{key.replace('_', '-')}"
        if isinstance(value, bool):
            flags.append(opt if value else f"--no-{opt[2:]}")
        elif isinstance(value, list):
            flags.append(
                f"{opt} {' '.join(map(shlex.quote, map(str, value)))}" if value else ""
            )
        else:
            flags.append(f"{opt} {shlex.quote(str(value))}")
    flags.append(tiles_flag(wildcards.backbone))
    return " ".join(f for f in flags if f)


def tiles_flag(name):
    """`--max-tiles N` of a tiling backbone that sets one (training and scoring alike)."""
    tiles = BACKBONES[name]["max_tiles"]
    return "" if tiles is None else f"--max-tiles {tiles}"


def score_settings(name):
    return {**config["score"], **BACKBONES[name]["scoring"]}


def score_flags(wildcards):
    """The scoring settings as `imatch score-set` flags (values shell-quoted)."""
    s = score_settings(wildcards.backbone)
    r = {**config["train"], **BACKBONES[wildcards.backbone]["recipe"]}
    compile_flag = "--compile" if s["compile"] else "--no-compile"
    share_flag = "--share-prefix" if s["share_prefix"] else "--no-share-prefix"
    s = {k: shlex.quote(str(v)) for k, v in s.items()}
    return (
        f"--batch-size {s['batch_size']} --dtype {s['dtype']} --device {s['device']}"
        f" --tau {s['tau']} --max-pixels {r['max_pixels']} --workers {s['workers']}"
        f" {compile_flag} {share_flag} {tiles_flag(wildcards.backbone)}"
    )


def scored_views(round_):
    """(split, view) pairs the models of a round score: what the evaluated and submitted
    predictors of that round need, the holdout for fitted weights, and val for the next round's
    pseudo labels. Grey-image (`blank`) views only for `blank-*` predictors."""
    sub = config["submission"]
    demands = [(p, s) for p in predictors() for s in config["evaluate"]["splits"]]
    demands.append((sub["predictor"], sub["split"]))
    needed = set()
    for name, split in demands:
        if name in BASELINES:
            continue
        r, _, _, blank, weights = model_predictor(name)
        if r == round_:
            needed.add((split, "blank" if blank else "seen"))
            if weights == "holdout" and split != "holdout":
                needed.add(("holdout", "seen"))
    if int(round_[1:]) < config["rounds"] or (
        round_ == "r1" and ablation_needs_pseudo()
    ):
        needed.add(("val", "seen"))
    if (
        round_ in ablation_level_rounds()
    ):  # element levels of the ablation split's queries
        needed.add((config["ablation"]["split"], "seen"))
    return sorted(needed)


def scoring_set(task, split, round_, view):
    """The instruction set a model scores: overall queries state the element levels predicted
    by this round's element models (grey-image ones for the blank view) when element
    augmentation is on."""
    path = instruction_set(task, split)
    if task == "overall" and uses_levels():
        blank = "-blank" if view == "blank" else ""
        path = path.replace(".parquet", f".levels-{round_}{blank}.parquet")
    return path


def scoring_sets(wildcards):
    """{view: instruction sets} one model scores."""
    sets = {"seen": [], "blank": []}
    for split, view in scored_views(wildcards.round):
        sets[view].append(scoring_set(wildcards.task, split, wildcards.round, view))
    return sets


def scoring_job_inputs(wildcards, model, sets):
    """Inputs of a scoring job (main or ablation model): the model, its backbone, the code, the sets."""
    return {
        "model": model,
        "backbone": backbone_input(wildcards),
        "code": code("score"),
        "arch": arch_code(wildcards),
        **sets,
    }


def gather_job_inputs(folder, sets):
    """Inputs of gathering one model's score shards from `folder`/shards/."""
    shards = [f"{folder}/shards/{k}.parquet" for k in range(config["score"]["shards"])]
    return {"shards": shards, "code": code("score"), **sets}


def score_inputs(wildcards):
    w = wildcards
    model = f"{RESULTS}/models/{w.backbone}/{w.task}-{w.round}"
    return scoring_job_inputs(w, model, scoring_sets(w))


def set_options(wildcards, input):
    """--instructions / --blank-instructions, each only when it has sets."""
    return " ".join(
        f"--{flag} {' '.join(input[view])}"
        for view, flag in (("seen", "instructions"), ("blank", "blank-instructions"))
        if input[view]
    )


def gather_inputs(wildcards):
    w = wildcards
    folder = f"{RESULTS}/scores/{w.backbone}/{w.task}-{w.round}"
    return gather_job_inputs(folder, scoring_sets(w))


def scores_of(backbone, task, round_):
    """One model's scores: every set and view it scored, in one table."""
    return f"{RESULTS}/scores/{backbone}/{task}-{round_}/scores.parquet"


def backbone_gpus(wildcards):
    """GPUs of a training or scoring job: the backbone's own `gpus`, else resources.gpus."""
    n = BACKBONES[wildcards.backbone]["gpus"]
    return config["resources"]["gpus"] if n is None else n


def cpus_per_gpu(wildcards, threads):
    """The job's cores spread over its GPUs (sbatch --cpus-per-gpu); 0 = no GPU, --cpus-per-task."""
    n = backbone_gpus(wildcards)
    return max(1, threads // n) if n else 0


def training_sets(wildcards):
    """Round 1 trains on the training set; round n > 1 also on val pseudo-labelled by round n-1
    (validation set augmentation, Eq. 8)."""
    sets = [instruction_set(wildcards.task, "train").replace(".parquet", ".jsonl")]
    previous = int(wildcards.round[1:]) - 1
    if previous >= 1:
        qname, _ = VARIANTS.add(wildcards.task, config["instructions"])
        sets.append(f"{RESULTS}/instructions/{qname}/val.pseudo-r{previous}.jsonl")
    return sets


def uses_levels():
    return VARIANTS.uses_element_levels(
        VARIANTS.add("overall", config["instructions"])[0]
    )


def pseudo_inputs(wildcards):
    """Pseudo-labelled val set of round n: labels from round n's ensemble, levels from its element models."""
    inputs = {
        "samples": f"{RESULTS}/pseudo/{wildcards.round}/samples.parquet",
        "elements": f"{RESULTS}/pseudo/{wildcards.round}/elements.parquet",
        "code": code("instructions"),
    }
    if VARIANTS.uses_element_levels(wildcards.query):
        inputs["element_levels"] = f"{RESULTS}/element_levels/{wildcards.round}.parquet"
    return inputs


def pseudo_flags(wildcards, input):
    flags = VARIANTS.query_flags(wildcards.query)
    if "element_levels" in input.keys():
        flags += f" --element-levels {input.element_levels}"
    return flags


def level_backbones():
    names = config["element_levels"]["from"] or members([], "element")
    unknown = set(names) - set(BACKBONES)
    if unknown:
        raise ValueError(
            f"config: element_levels.from names unknown backbones {sorted(unknown)}"
        )
    return names


def element_level_scores(wildcards):
    round_ = wildcards.levels.partition("-")[0]
    return [scores_of(name, "element", round_) for name in level_backbones()]


def levels_view(wildcards):
    return "blank" if wildcards.levels.endswith("-blank") else "seen"


def input_dir(wildcards, input):
    return str(Path(input[0]).parent)


def scratch_dir(wildcards):
    """Trainer checkpoints live outside the declared output, so Snakemake never deletes them
    before a rerun and a killed job resumes."""
    return f"{RESULTS}/scratch/{wildcards.backbone}/{wildcards.task}-{wildcards.round}"


def tau_of(wildcards):
    return score_settings(wildcards.backbone)["tau"]


def members(names, task):
    """The backbones named, or every backbone that trains a model of `task` (names checked by
    config_checks at parse time)."""
    return names or [b for b in BACKBONES if task in BACKBONES[b]["tasks"]]


def model_predictor(name):
    """(round, overall backbones, element backbones, blank images, weights) of a model predictor:
    a backbone, `ensemble` (Fig. 6), `ensemble-r1` (labels val for round 2), or `blank-<one of
    those>` (the same models scoring grey images: the control)."""
    blank = name.startswith("blank-")
    base = name.removeprefix("blank-")
    if base in BACKBONES:
        return FINAL, [base], [base], blank, "mean"
    if base == "ensemble":
        e = config["ensemble"]
        return (
            FINAL,
            members(e["overall"], "overall"),
            members(e["element"], "element"),
            blank,
            e["weights"],
        )
    if base == "ensemble-r1":
        return "r1", *pseudo_label_backbones(), blank, "mean"
    raise ValueError(f"unknown predictor {name!r}")


MODEL_PREDICTORS = [
    n for n in config_checks.predictor_names(list(BACKBONES)) if n not in BASELINES
]


wildcard_constraints:
    predictor="|".join(map(re.escape, [*BASELINES, *MODEL_PREDICTORS])),
    model_predictor="|".join(map(re.escape, MODEL_PREDICTORS)),
    view="seen|blank",
    shard="[0-9]+",


def exported_predictions(wildcards):
    """The submission's predictions: their provenance names the models `export` copies."""
    sub = config["submission"]
    return (
        f"{RESULTS}/predictions/{sub['predictor']}/{sub['split']}/predictions.parquet"
    )


def predictor_scores(wildcards):
    round_, overall, element, blank, weights = model_predictor(
        wildcards.model_predictor
    )
    inputs = {
        "overall": [scores_of(b, "overall", round_) for b in overall],
        "element": [scores_of(b, "element", round_) for b in element],
        "code": code("ensemble"),
    }
    # weights fitted on the labelled holdout never predict the holdout itself
    if weights == "holdout" and wildcards.split != "holdout":
        inputs["weights"] = f"{RESULTS}/ensemble/{round_}/weights.json"
    return inputs


def predictor_view(wildcards):
    return "blank" if model_predictor(wildcards.model_predictor)[3] else "seen"


def weights_option(wildcards, input):
    return f"--weights {input.weights}" if "weights" in input.keys() else ""


def weight_inputs(wildcards):
    _, overall, element, _, _ = model_predictor("ensemble")
    return {
        "overall": [scores_of(b, "overall", wildcards.round) for b in overall],
        "element": [scores_of(b, "element", wildcards.round) for b in element],
        "samples": rules.ingest.output.samples,
        "elements": rules.ingest.output.elements,
        "code": code("ensemble"),
    }


def predictors():
    return config["evaluate"][
        "predictors"
    ]  # names checked by config_checks at parse time


def report_predictions(wildcards):
    return [
        f"{RESULTS}/predictions/{p}/{wildcards.split}/predictions.parquet"
        for p in predictors()
    ]


def report_element_predictions(wildcards):
    return [
        f"{RESULTS}/predictions/{p}/{wildcards.split}/element_predictions.parquet"
        for p in predictors()
    ]


def pseudo_label_backbones():
    """(overall, element) backbones whose round-1 models label val for round 2."""
    p = config["pseudo_labels"]
    element = p["from"] if p["element_from"] is None else p["element_from"]
    return members(p["from"], "overall"), members(element, "element")


def training_records(wildcards):
    rounds = [f"r{r}" for r in range(1, config["rounds"] + 1)]
    return [
        f"{RESULTS}/models/{b}/{task}-{r}"
        for b in BACKBONES
        for task in BACKBONES[b]["tasks"]
        for r in rounds
    ]


# ---- ablation rows (paper Tables 4 and 5; rules in ablation.smk) ----------------------------
ABLATION = config["ablation"]


def ablation_variant(task, row):
    """(model name, round) of an ablation row: the instruction set names of its settings (rows
    with equal settings share a model) and round 2 when it uses the pseudo-labelled val.
    """
    cfg = copy.deepcopy(config["instructions"])
    if task == "overall":
        cfg["overall"]["element_levels"] = row["element_levels"]
        cfg["overall"]["image_augmentation"] = row["image_augmentation"]
        round_ = "r2" if row["validation"] else "r1"
    else:
        cfg["element"]["prompt_type"] = row["prompt_type"]
        cfg["element"]["score_perturbation"]["enabled"] = row["score_perturbation"]
        round_ = FINAL
    qname, tname = VARIANTS.add(task, cfg)
    return f"{qname}.{tname}", round_


ABLATION_MODELS = {
    task: [ablation_variant(task, row) for row in ABLATION[task]]
    for task in ("overall", "element")
}


def ablation_needs_pseudo():
    return any(r == "r2" for models in ABLATION_MODELS.values() for _, r in models)


def ablation_level_rounds():
    return {
        r
        for v, r in ABLATION_MODELS["overall"]
        if VARIANTS.uses_element_levels(v.split(".")[0])
    }


wildcard_constraints:
    variant=r"(overall|element)-[0-9a-f]{8}\.[0-9a-f]{8}",


def ablation_sets(wildcards):
    qname, tname = wildcards.variant.split(".")
    sets = [f"{RESULTS}/instructions/{qname}/train-{tname}.jsonl"]
    if wildcards.round == "r2":
        sets.append(f"{RESULTS}/instructions/{qname}/val.pseudo-r1.jsonl")
    return sets


def ablation_scoring_sets(wildcards):
    qname = wildcards.variant.split(".")[0]
    name = ABLATION["split"]
    if VARIANTS.uses_element_levels(qname):
        name += f".levels-{wildcards.round}"
    return {"seen": [f"{RESULTS}/instructions/{qname}/{name}.parquet"], "blank": []}


def ablation_model(wildcards):
    return f"{RESULTS}/ablation/models/{wildcards.backbone}/{wildcards.variant}-{wildcards.round}"


def ablation_scratch(wildcards):
    return f"{RESULTS}/ablation/scratch/{wildcards.backbone}/{wildcards.variant}-{wildcards.round}"


def ablation_score_inputs(wildcards):
    sets = ablation_scoring_sets(wildcards)
    return scoring_job_inputs(wildcards, ablation_model(wildcards), sets)


def ablation_gather_inputs(wildcards):
    w = wildcards
    folder = f"{RESULTS}/ablation/scores/{w.backbone}/{w.variant}-{w.round}"
    return gather_job_inputs(folder, ablation_scoring_sets(w))


def ablation_plan(task):
    """(row, backbone, score table) of every cell of the table."""
    return [
        {
            "row": row,
            "backbone": b,
            "scores": f"{RESULTS}/ablation/scores/{b}/{v}-{r}/scores.parquet",
        }
        for row, (v, r) in zip(ABLATION[task], ABLATION_MODELS[task])
        for b in members(ABLATION["backbones"], "element")
    ]


def ablation_targets():
    return [
        f"{RESULTS}/ablation/table_{task}.tsv"
        for task in ("overall", "element")
        if ABLATION[task] and BACKBONES
    ]
