"""What the JSON schema cannot say about a config, checked when Snakemake parses it.

The schema checks each key on its own; these checks relate keys to each other (a backbone's
`recipe` / `scoring` overrides against the `train` / `score` schema, every name that must be a
backbone or a predictor, files that must exist). They run whether or not results exist: on a
finished results tree a wrong name would otherwise plan nothing and exit 0 ("Nothing to be done").
Every message names the key.

`imatch check-config [FILE ...]` runs the same checks without Snakemake (on a login node, before a
submission), and names the file and line of a YAML syntax error: Snakemake reads `--configfile`
files before any workflow code runs, and its message ("Config file is not valid JSON or YAML")
names neither.
"""

from __future__ import annotations

import os
from pathlib import Path

BASELINES = ["prior", "text"]


class ConfigError(ValueError):
    """A config that cannot mean what it says, named by its key."""

    def __init__(self, message: str):
        super().__init__(f"config: {message}")


def predictor_names(backbones: list[str]) -> list[str]:
    """Every predictor a config may evaluate or submit: the baselines, each backbone, the final
    ensemble, the round-1 ensemble, and the grey-image control of each model predictor."""
    models = [*backbones, "ensemble", "ensemble-r1"]
    return [*BASELINES, *models, *(f"blank-{n}" for n in [*backbones, "ensemble"])]


def _schema_errors(section_schema: dict, values: dict) -> list[str]:
    from jsonschema import Draft202012Validator

    return [f"{'.'.join(map(str, e.path)) or '(all)'}: {e.message}"
            for e in Draft202012Validator(section_schema).iter_errors(values)]


def check_overrides(config: dict, schema: dict) -> None:
    """A backbone's `recipe` (of `train`) and `scoring` (of `score`): known keys, valid values once
    merged (a typo would reach the shell as an unknown flag, or be ignored)."""
    for b in config["backbones"]:
        for key, section in (("recipe", "train"), ("scoring", "score")):
            overrides = b.get(key) or {}
            known = schema["properties"][section]["properties"]
            unknown = sorted(set(overrides) - set(known))
            if unknown:
                raise ConfigError(f"backbones[{b['name']}].{key}: unknown key(s) {unknown}; "
                                  f"the keys of `{section}` are {sorted(known)}")
            errors = _schema_errors(schema["properties"][section], {**config[section], **overrides})
            if errors:
                raise ConfigError(f"backbones[{b['name']}].{key}: {errors[0]}")


def check_placement(config: dict) -> None:
    """A recipe that splits a model's layers over GPUs (`split_layers`) needs two GPUs or more."""
    for b in config["backbones"]:
        recipe = {**config["train"], **(b.get("recipe") or {})}
        gpus = config["resources"]["gpus"] if b.get("gpus") is None else b["gpus"]
        if recipe.get("split_layers") and gpus < 2:
            where = "recipe.split_layers" if "split_layers" in (b.get("recipe") or {}) else "(train.split_layers)"
            raise ConfigError(f"backbones[{b['name']}].{where}: splitting the layers needs gpus >= 2, the backbone "
                              f"has {gpus} (set backbones[{b['name']}].gpus)")


def check_pretrained(config: dict, workdir: Path) -> None:
    """A `source: pretrained` backbone's packed file must exist before anything runs (it is shipped,
    not made by a rule), and it is a tiny one."""
    from imatch.plan import pretrained_file

    for b in config["backbones"]:
        if b.get("source") != "pretrained":
            continue
        if b.get("size", "tiny") != "tiny":
            raise ConfigError(f"backbones[{b['name']}].size: source pretrained is a tiny backbone, not {b['size']!r}")
        path = Path(workdir) / pretrained_file(b)
        if not path.is_file():
            raise ConfigError(f"backbones[{b['name']}]: {path} does not exist (source pretrained; the command "
                              f"that makes it: pretrained/README.md)")


def check_names(config: dict) -> None:
    """Names that refer to backbones or predictors must exist."""
    names = [b["name"] for b in config["backbones"]]
    seen = set()
    for name in names:
        if name in seen:
            raise ConfigError(f"backbones: the name {name!r} is used twice")
        seen.add(name)
    reserved = {*BASELINES, "ensemble", "ensemble-r1"}
    for b in config["backbones"]:
        if b["name"] in reserved or b["name"].startswith("blank-"):
            raise ConfigError(f"backbones: {b['name']!r} is reserved (not {sorted(reserved)}, not blank-*)")
        if b["arch"] == "qwen2_5_vl" and b.get("max_tiles") is not None:
            raise ConfigError(f"backbones[{b['name']}].max_tiles: only for the tiling architectures (internvl, "
                              "ovis2); Qwen2.5-VL's image budget is train.max_pixels")
    lists = {"ensemble.overall": config["ensemble"]["overall"], "ensemble.element": config["ensemble"]["element"],
             "pseudo_labels.from": config["pseudo_labels"]["from"],
             "pseudo_labels.element_from": config["pseudo_labels"].get("element_from"),
             "element_levels.from": config.get("element_levels", {}).get("from", []),
             "ablation.backbones": config.get("ablation", {}).get("backbones", [])}
    for key, values in lists.items():
        unknown = sorted(set(values or []) - set(names))
        if unknown:
            raise ConfigError(f"{key}: unknown backbone(s) {unknown}; the backbones are {names}")
    check_tasks(config)
    predictors = predictor_names(names)
    unknown = sorted(set(config["evaluate"]["predictors"]) - set(predictors))
    if unknown:
        raise ConfigError(f"evaluate.predictors: unknown predictor(s) {unknown}; known: {predictors}")
    if config["submission"]["predictor"] not in predictors:
        raise ConfigError(f"submission.predictor: unknown predictor {config['submission']['predictor']!r}; "
                          f"known: {predictors}")


def check_tasks(config: dict) -> None:
    """A backbone that trains no model of a task (`backbones[].tasks`) is named nowhere that task's
    models are used: a backbone predictor uses both of its models."""
    tasks = {b["name"]: b.get("tasks", ["overall", "element"]) for b in config["backbones"]}
    pseudo = config["pseudo_labels"]
    element_from = pseudo.get("element_from")
    uses = [("ensemble.overall", config["ensemble"]["overall"], "overall"),
            ("ensemble.element", config["ensemble"]["element"], "element"),
            ("pseudo_labels.from", pseudo["from"], "overall"),
            ("pseudo_labels.element_from" if element_from is not None else "pseudo_labels.from (element_from: null)",
             pseudo["from"] if element_from is None else element_from, "element"),
            ("element_levels.from", config.get("element_levels", {}).get("from", []), "element")]
    ablation = config.get("ablation", {}).get("backbones", [])
    uses += [("ablation.backbones", ablation, "overall"), ("ablation.backbones", ablation, "element")]
    predictors = [config["submission"]["predictor"], *config["evaluate"]["predictors"]]
    backbone_predictors = [p.removeprefix("blank-") for p in predictors if p.removeprefix("blank-") in tasks]
    uses += [("evaluate.predictors / submission.predictor", backbone_predictors, task) for task in ("overall", "element")]
    for key, values, task in uses:
        lacking = sorted({v for v in values or [] if v in tasks and task not in tasks[v]})
        if lacking:
            raise ConfigError(f"{key}: {lacking} train(s) no {task} model (backbones[{lacking[0]}].tasks: "
                              f"{tasks[lacking[0]]})")


def check_paths(config: dict, workdir: Path) -> None:
    """Input files the config names must exist (relative to the working directory)."""
    data = config["data"]
    if data["source"] == "local":
        if not data.get("local_dir"):
            raise ConfigError("data.local_dir: data.source is 'local' but no folder is given")
        if not (workdir / data["local_dir"]).is_dir():
            raise ConfigError(f"data.local_dir: {data['local_dir']} is not a folder")
    for key in ("eval_json", "final_test"):
        if data.get(key) and not (workdir / data[key]).is_file():
            raise ConfigError(f"data.{key}: {data[key]} is not a file")


def check_writable(results: Path) -> None:
    """Every folder of the log tree must be writable. Snakemake deletes a job's old outputs before
    the job runs; a job that cannot then write its log fails with its previous outputs gone (a
    read-only log folder cost the last `submission.zip`). Refused before any job starts."""
    logs = Path(results) / "logs"
    if not logs.is_dir():
        return
    for folder, _, _ in os.walk(logs):
        if not os.access(folder, os.W_OK | os.X_OK, effective_ids=True):
            raise ConfigError(f"results: log folder {folder} is not writable; a job would lose its previous "
                              "outputs before failing to write its log")


def check(config: dict, schema: dict, workdir: Path) -> None:
    check_names(config)
    check_overrides(config, schema)
    check_placement(config)
    check_pretrained(config, workdir)
    check_paths(config, workdir)
    check_writable(workdir / config["results"])


def read_yaml(path: Path) -> dict:
    """A config file, or an error naming the file, line and column of a YAML mistake."""
    import yaml

    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: not valid YAML: {where}{problem}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: a config file holds keys at its top level, not a {type(loaded).__name__}")
    return loaded


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("check-config", help="check config files as the workflow will (YAML, schema, references)",
                              description=__doc__)
    p.add_argument("configs", nargs="*", type=Path, metavar="FILE",
                   help="config files given to snakemake with --configfile, in their order (on top of config/config.yaml)")
    p.add_argument("--workdir", type=Path, default=Path("."),
                   help="the workflow's working directory, holding config/config.yaml (default: .)")
    p.set_defaults(func=_run)


def with_defaults(config: dict, schema: dict) -> dict:
    """The config validated and completed as Snakemake's validate(set_default=True) leaves it; a
    schema error names the key (`train.lr_scheduler: 3 is not of type 'string'`)."""
    import copy

    from jsonschema import Draft202012Validator, ValidationError
    from jsonschema.validators import extend

    def set_defaults(validator, properties, instance, sub_schema):
        for name, sub in properties.items():
            if isinstance(instance, dict) and "default" in sub:
                instance.setdefault(name, copy.deepcopy(sub["default"]))
        yield from Draft202012Validator.VALIDATORS["properties"](validator, properties, instance, sub_schema)

    config = copy.deepcopy(config)
    try:
        extend(Draft202012Validator, {"properties": set_defaults})(schema).validate(config)
    except ValidationError as exc:
        key = ".".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise ConfigError(f"{key}: {exc.message}") from None
    return config


def load(configs: list[Path], workdir: Path) -> tuple[dict, dict]:
    """(config, schema): config/config.yaml and `configs` merged as Snakemake merges --configfile
    files (later files win, key by key), validated and completed with the schema's defaults."""
    import yaml
    from snakemake.utils import update_config

    schema = yaml.safe_load((Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml").read_text())
    config: dict = {}
    for path in [workdir / "config" / "config.yaml", *configs]:
        update_config(config, read_yaml(path))
    return with_defaults(config, schema), schema


def _run(args) -> int:
    from imatch.errors import InputError

    files = [args.workdir / "config" / "config.yaml", *args.configs]
    try:
        config, schema = load(args.configs, args.workdir)
        check(config, schema, args.workdir)
    except ConfigError as exc:
        raise InputError(" + ".join(map(str, files)), str(exc)) from None
    except OSError as exc:
        raise InputError(exc.filename or files[0], exc.strerror or str(exc)) from None
    print(f"config ok: {' + '.join(map(str, files))}")
    return 0
