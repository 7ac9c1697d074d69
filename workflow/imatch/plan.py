"""What the workflow builds for a config, decided in plain Python.

The Snakemake files map these decisions to rules and paths of jobs; the decisions themselves
(which splits exist, which models a predictor combines, which sets each round's models score,
which backbones label val and give element levels, which model an ablation row trains, the
command-line flags of a recipe) live here, unit-tested on configs (tests/test_plan.py), not only
through dry runs.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

from imatch.config_checks import BASELINES, predictor_names
from imatch.variants import Registry

TASKS = ("overall", "element")
# recipe keys that change nothing at these values (one process per GPU, no memory cap, eager blocks):
# not passed then
QUIET_DEFAULTS = {"split_layers": False, "gpu_memory_cap": 0, "compile": False}


def _named(values) -> dict:
    """A dict of Snakemake's wildcards / input (named lists: `in` tests their values, not names)."""
    return dict(values.items())


def flags(options: dict) -> str:
    """`{key: value}` as command-line flags, in the dict's order: `--key value` (shell-quoted),
    `--key` / `--no-key` for booleans, `--key a b` for lists (nothing for an empty one)."""
    out = []
    for key, value in options.items():
        opt = f"--{key.replace('_', '-')}"
        if isinstance(value, bool):
            out.append(opt if value else f"--no-{opt[2:]}")
        elif isinstance(value, list):
            out.append(f"{opt} {' '.join(shlex.quote(str(v)) for v in value)}" if value else "")
        else:
            out.append(f"{opt} {shlex.quote(str(value))}")
    return " ".join(f for f in out if f)


class Plan:
    """The decisions for one validated config (defaults filled in, names checked by
    `config_checks`). Paths are under `config["results"]`, as the rules write them."""

    def __init__(self, config: dict):
        self.config = config
        self.results = config["results"]
        self.backbones = {b["name"]: b for b in config["backbones"]}
        self.final = f"r{config['rounds']}"  # round 2 = trained again on train + pseudo-labelled val
        self.variants = Registry(config["instructions"])
        self.ablation = config["ablation"]
        self.ablation_models = {task: [self.ablation_variant(task, row) for row in self.ablation[task]]
                                for task in TASKS}
        self.model_predictors = [n for n in predictor_names(list(self.backbones)) if n not in BASELINES]

    # ---- data and instruction sets ---------------------------------------------------------

    def available_splits(self) -> list[str]:
        """Splits ingest will produce, known before it runs (the DAG needs them)."""
        splits = ["train", "val"]
        if self.config["ingest"]["holdout_fraction"] > 0:
            splits.append("holdout")
        data = self.config["data"]
        if (data["final_test"]
                or (data["source"] == "demo" and self.config["demo"]["test_prompts"] > 0)
                or (data["source"] == "local" and (Path(data["local_dir"] or ".") / "final_test.json").is_file())):
            splits.append("test")
        return splits

    def instruction_set(self, task: str, split: str) -> str:
        """Path of the configured instruction set of `task` for `split`."""
        qname, tname = self.variants.add(task, self.config["instructions"])
        name = f"train-{tname}" if split == "train" else split
        return f"{self.results}/instructions/{qname}/{name}.parquet"

    def instruction_targets(self) -> list[str]:
        """Every set buildable now; overall sets of other splits with element levels need the
        element model's predicted levels (scoring stage) and are requested by it."""
        targets = []
        for task in TASKS:
            qname, _ = self.variants.add(task, self.config["instructions"])
            for split in self.available_splits():
                if split == "train" or not self.variants.uses_element_levels(qname):
                    targets.append(self.instruction_set(task, split))
        return targets

    def uses_levels(self) -> bool:
        """Whether the overall queries state element levels (element augmentation, Sec. 3.2)."""
        return self.variants.uses_element_levels(self.variants.add("overall", self.config["instructions"])[0])

    def ingest_inputs(self) -> dict[str, str]:
        """What ingest reads: the demo folder, the download manifest or the user's folder, and
        explicit label / test files when configured."""
        data = self.config["data"]
        if data["source"] == "demo":
            inputs = {"source": f"{self.results}/demo/source"}
        elif data["source"] == "hub":
            inputs = {"source": f"{self.config['hub']['dir']}/manifest.json"}
        elif not data["local_dir"]:
            raise ValueError("config: data.source is 'local' but data.local_dir is not set")
        else:
            inputs = {"source": data["local_dir"]}
        inputs.update({key: data[key] for key in ("eval_json", "final_test") if data[key]})
        return inputs

    def ingest_source(self, source: str) -> str:
        """The folder ingest reads (the downloaded folder of a hub manifest)."""
        return str(Path(source).parent) if self.config["data"]["source"] == "hub" else source

    def ingest_options(self, inputs: dict) -> str:
        """Explicit label/test files when configured; else ingest looks inside the source folder."""
        inputs = _named(inputs)
        options = [f"--{key.replace('_', '-')} {Path(inputs[key]).resolve()}" for key in ("eval_json", "final_test")
                   if key in inputs]
        if self.config["ingest"]["skip_bad_records"]:
            options.append("--skip-bad-records")
        return " ".join(options)

    def instruction_inputs(self, w: dict) -> dict[str, str]:
        """The ingested tables, and what a set's queries state beyond them: the augmented images of
        a training set (`train`), the element levels predicted by a round (`levels`)."""
        w = _named(w)
        inputs = {"samples": f"{self.results}/data/samples.parquet", "elements": f"{self.results}/data/elements.parquet"}
        split = w.get("split", "train")
        if split == "train":
            aug = self.variants.augmentation_of(w["train"])
            if aug is not None:
                inputs["augmented"] = f"{self.results}/augment/{aug}/augmented.parquet"
        elif "levels" in w:
            inputs["element_levels"] = f"{self.results}/element_levels/{w['levels']}.parquet"
        elif self.variants.uses_element_levels(w["query"]):
            raise ValueError(f"{w['query']} states element levels: its {split} set needs a round")
        return inputs

    def instruction_flags(self, w: dict, inputs: dict) -> str:
        """`imatch instructions` flags of a set: its query and training settings, its augmented
        images, and the element levels its queries state (predicted, or the ground truth)."""
        w, inputs = _named(w), _named(inputs)
        out = [self.variants.query_flags(w["query"])]
        if "train" in w:
            out.append(self.variants.train_flags(w["train"]))
        if "augmented" in inputs:
            out.append(f"--augmented {inputs['augmented']}")
        if self.variants.uses_element_levels(w["query"]):
            out.append(f"--element-levels {inputs.get('element_levels', 'ground-truth')}")
        return " ".join(f for f in out if f)

    def pseudo_inputs(self, w: dict) -> dict[str, str]:
        """Pseudo-labelled val set of round n: labels from round n's ensemble, levels from its element models."""
        w = _named(w)
        folder = f"{self.results}/pseudo/{w['round']}"
        inputs = {"samples": f"{folder}/samples.parquet", "elements": f"{folder}/elements.parquet"}
        if self.variants.uses_element_levels(w["query"]):
            inputs["element_levels"] = f"{self.results}/element_levels/{w['round']}.parquet"
        return inputs

    def pseudo_flags(self, w: dict, inputs: dict) -> str:
        w, inputs = _named(w), _named(inputs)
        out = self.variants.query_flags(w["query"])
        if "element_levels" in inputs:
            out += f" --element-levels {inputs['element_levels']}"
        return out

    def augment_flags(self, aug: str) -> str:
        return Registry.augment_flags(self.variants.augment[aug])

    # ---- models and predictors ---------------------------------------------------------------

    def members(self, names: list[str], task: str) -> list[str]:
        """The backbones named, or every backbone that trains a model of `task`."""
        return list(names) or [b for b, spec in self.backbones.items() if task in spec["tasks"]]

    def predictors(self) -> list[str]:
        return self.config["evaluate"]["predictors"]

    def model_predictor(self, name: str) -> tuple[str, list[str], list[str], bool, str]:
        """(round, overall backbones, element backbones, blank images, weights) of a model predictor:
        a backbone, `ensemble` (Fig. 6), `ensemble-r1` (labels val for round 2), or `blank-<one of
        those>` (the same models scoring grey images: the control)."""
        blank = name.startswith("blank-")
        base = name.removeprefix("blank-")
        if base in self.backbones:
            return self.final, [base], [base], blank, "mean"
        if base == "ensemble":
            e = self.config["ensemble"]
            return self.final, self.members(e["overall"], "overall"), self.members(e["element"], "element"), blank, e["weights"]
        if base == "ensemble-r1":
            return "r1", *self.pseudo_label_backbones(), blank, "mean"
        raise ValueError(f"unknown predictor {name!r}")

    def pseudo_label_backbones(self) -> tuple[list[str], list[str]]:
        """(overall, element) backbones whose round-1 models label val for round 2."""
        p = self.config["pseudo_labels"]
        element = p["from"] if p["element_from"] is None else p["element_from"]
        return self.members(p["from"], "overall"), self.members(element, "element")

    def level_backbones(self) -> list[str]:
        """The element models whose predicted levels the overall queries state at test time."""
        names = self.config["element_levels"]["from"] or self.members([], "element")
        unknown = set(names) - set(self.backbones)
        if unknown:
            raise ValueError(f"config: element_levels.from names unknown backbones {sorted(unknown)}")
        return names

    def scored_views(self, round_: str) -> list[tuple[str, str]]:
        """(split, view) pairs the models of a round score: what the evaluated and submitted
        predictors of that round need, the holdout for fitted weights, and val for the next round's
        pseudo labels. Grey-image (`blank`) views only for `blank-*` predictors."""
        sub = self.config["submission"]
        demands = [(p, s) for p in self.predictors() for s in self.config["evaluate"]["splits"]]
        demands.append((sub["predictor"], sub["split"]))
        needed = set()
        for name, split in demands:
            if name in BASELINES:
                continue
            r, _, _, blank, weights = self.model_predictor(name)
            if r == round_:
                needed.add((split, "blank" if blank else "seen"))
                if weights == "holdout" and split != "holdout":
                    needed.add(("holdout", "seen"))
        if int(round_[1:]) < self.config["rounds"] or (round_ == "r1" and self.ablation_needs_pseudo()):
            needed.add(("val", "seen"))
        if round_ in self.ablation_level_rounds():  # element levels of the ablation split's queries
            needed.add((self.ablation["split"], "seen"))
        return sorted(needed)

    def scoring_set(self, task: str, split: str, round_: str, view: str) -> str:
        """The instruction set a model scores: overall queries state the element levels predicted
        by this round's element models (grey-image ones for the blank view) when element
        augmentation is on."""
        path = self.instruction_set(task, split)
        if task == "overall" and self.uses_levels():
            blank = "-blank" if view == "blank" else ""
            path = path.replace(".parquet", f".levels-{round_}{blank}.parquet")
        return path

    def scoring_sets(self, task: str, round_: str) -> dict[str, list[str]]:
        """{view: instruction sets} one model scores."""
        sets: dict[str, list[str]] = {"seen": [], "blank": []}
        for split, view in self.scored_views(round_):
            sets[view].append(self.scoring_set(task, split, round_, view))
        return sets

    def training_sets(self, task: str, round_: str) -> list[str]:
        """Round 1 trains on the training set; round n > 1 also on val pseudo-labelled by round
        n-1 (validation set augmentation, Eq. 8)."""
        sets = [self.instruction_set(task, "train").replace(".parquet", ".jsonl")]
        previous = int(round_[1:]) - 1
        if previous >= 1:
            qname, _ = self.variants.add(task, self.config["instructions"])
            sets.append(f"{self.results}/instructions/{qname}/val.pseudo-r{previous}.jsonl")
        return sets

    def backbone_dir(self, name: str) -> str:
        """Folder of a backbone in the native transformers layout."""
        b = self.backbones[name]
        if b["source"] in ("tiny", "pretrained"):
            return f"{self.results}/backbones/{name}"
        if b["source"] == "local":
            return b["checkpoint"]
        suffix = "-native" if b["arch"] == "ovis2" else ""
        return f"resources/backbones/{name}{suffix}"

    def backbones_from(self, source: str) -> list[str]:
        """Names of the backbones whose weights come from `source` (tiny, pretrained, hub, local)."""
        return [name for name, b in self.backbones.items() if b["source"] == source]

    def pretrained_file(self, name: str) -> str:
        """The shipped packed file of a `source: pretrained` backbone."""
        return pretrained_file(self.backbones[name])

    def backbone_input(self, name: str) -> str:
        """What makes a fine-tune stale: the built folder, or the download's manifest."""
        b = self.backbones[name]
        if b["source"] == "hub" and b["arch"] != "ovis2":
            return f"resources/backbones/{name}/manifest.json"
        return self.backbone_dir(name)

    def gpus(self, backbone: str) -> int:
        """GPUs of a training or scoring job: the backbone's own `gpus`, else resources.gpus."""
        n = self.backbones[backbone]["gpus"]
        return self.config["resources"]["gpus"] if n is None else n

    def cpus_per_gpu(self, backbone: str, threads: int) -> int:
        """The job's cores spread over its GPUs (sbatch --cpus-per-gpu); 0 = no GPU, --cpus-per-task."""
        n = self.gpus(backbone)
        return max(1, threads // n) if n else 0

    def shards(self, folder: str) -> list[str]:
        """The score shards of one model, under `folder`/shards/."""
        return [f"{folder}/shards/{k}.parquet" for k in range(self.config["score"]["shards"])]

    @staticmethod
    def set_options(inputs: dict) -> str:
        """--instructions / --blank-instructions, each only when it has sets."""
        inputs = _named(inputs)
        return " ".join(f"--{flag} {' '.join(inputs[view])}"
                        for view, flag in (("seen", "instructions"), ("blank", "blank-instructions")) if inputs[view])

    def element_level_scores(self, levels: str) -> list[str]:
        """The element scores whose levels a `levels` wildcard (round, `-blank` for grey images) names."""
        round_ = levels.partition("-")[0]
        return [self.scores_of(name, "element", round_) for name in self.level_backbones()]

    def predictor_inputs(self, predictor: str, split: str) -> dict[str, list[str] | str]:
        """The score tables a model predictor combines, and the holdout-fitted weights when it uses
        them (never when predicting the holdout itself)."""
        round_, overall, element, _, weights = self.model_predictor(predictor)
        inputs: dict = {"overall": [self.scores_of(b, "overall", round_) for b in overall],
                        "element": [self.scores_of(b, "element", round_) for b in element]}
        if weights == "holdout" and split != "holdout":
            inputs["weights"] = f"{self.results}/ensemble/{round_}/weights.json"
        return inputs

    def weight_inputs(self, round_: str) -> dict[str, list[str]]:
        """The score tables whose holdout predictions fit the ensemble's weights."""
        _, overall, element, _, _ = self.model_predictor("ensemble")
        return {"overall": [self.scores_of(b, "overall", round_) for b in overall],
                "element": [self.scores_of(b, "element", round_) for b in element]}

    def predictions(self, split: str, kind: str = "predictions") -> list[str]:
        """The evaluated predictors' tables of a split (`predictions` or `element_predictions`)."""
        return [f"{self.results}/predictions/{p}/{split}/{kind}.parquet" for p in self.predictors()]

    def exported_predictions(self) -> str:
        """The submission's predictions: their provenance names the models `export` copies."""
        sub = self.config["submission"]
        return f"{self.results}/predictions/{sub['predictor']}/{sub['split']}/predictions.parquet"

    def scores_of(self, backbone: str, task: str, round_: str) -> str:
        """One model's scores: every set and view it scored, in one table."""
        return f"{self.results}/scores/{backbone}/{task}-{round_}/scores.parquet"

    def training_records(self) -> list[str]:
        """Every trained model of every round (each backbone's own tasks)."""
        return [f"{self.results}/models/{b}/{task}-r{r}" for b, spec in self.backbones.items()
                for task in spec["tasks"] for r in range(1, self.config["rounds"] + 1)]

    # ---- settings as flags ---------------------------------------------------------------

    def recipe(self, backbone: str) -> dict:
        """The training recipe of a backbone: `train`, overridden by its own `recipe`."""
        return {**self.config["train"], **self.backbones[backbone]["recipe"]}

    def score_settings(self, backbone: str) -> dict:
        """The scoring settings of a backbone: `score`, overridden by its own `scoring`."""
        return {**self.config["score"], **self.backbones[backbone]["scoring"]}

    def tiles_flag(self, backbone: str) -> str:
        """`--max-tiles N` of a tiling backbone that sets one (training and scoring alike)."""
        tiles = self.backbones[backbone]["max_tiles"]
        return "" if tiles is None else f"--max-tiles {tiles}"

    def recipe_flags(self, backbone: str, seed: int | None = None) -> str:
        """The recipe as `imatch train` flags (keys checked by config_checks). The placement keys
        (`QUIET_DEFAULTS`) are left out at their default: a config that does not use them keeps its
        jobs' commands, and Snakemake does not retrain a finished model for a flag that changes nothing."""
        recipe = {**self.recipe(backbone), **({} if seed is None else {"seed": seed})}  # an ablation seed
        recipe = {k: v for k, v in sorted(recipe.items()) if not (k in QUIET_DEFAULTS and v == QUIET_DEFAULTS[k])}
        return " ".join(f for f in (flags(recipe), self.tiles_flag(backbone)) if f)

    def score_flags(self, backbone: str) -> str:
        """The scoring settings as `imatch score-set` flags; the image budget is the recipe's."""
        s = self.score_settings(backbone)
        options = {k: s[k] for k in ("batch_size", "dtype", "device", "tau")}
        options["max_pixels"] = self.recipe(backbone)["max_pixels"]
        options.update({k: s[k] for k in ("workers", "compile", "share_prefix")})
        return f"{flags(options)} {self.tiles_flag(backbone)}"

    # ---- ablation rows (paper Tables 4 and 5) ----------------------------------------------

    def ablation_variant(self, task: str, row: dict) -> tuple[str, str]:
        """(model name, round) of an ablation row: the instruction set names of its settings (rows
        with equal settings share a model) and round 2 when it uses the pseudo-labelled val."""
        cfg = copy.deepcopy(self.config["instructions"])
        if task == "overall":
            cfg["overall"]["element_levels"] = row["element_levels"]
            cfg["overall"]["image_augmentation"] = row["image_augmentation"]
            round_ = "r2" if row["validation"] else "r1"
        else:
            cfg["element"]["prompt_type"] = row["prompt_type"]
            cfg["element"]["score_perturbation"]["enabled"] = row["score_perturbation"]
            round_ = self.final
        if not row.get("metadata", True):
            cfg[task]["metadata"] = {field: False for field in cfg[task]["metadata"]}
        qname, tname = self.variants.add(task, cfg)
        return f"{qname}.{tname}", round_

    def ablation_needs_pseudo(self) -> bool:
        return any(r == "r2" for models in self.ablation_models.values() for _, r in models)

    def ablation_level_rounds(self) -> set[str]:
        return {r for v, r in self.ablation_models["overall"] if self.variants.uses_element_levels(v.split(".")[0])}

    def ablation_seeds(self) -> list[int | None]:
        """The training seeds of every ablation model (`ablation.seeds`); [None]: the recipe's, once."""
        return self.ablation.get("seeds") or [None]

    @staticmethod
    def seeded(variant: str, seed: int | None) -> str:
        """An ablation model's name: its row's variant, `.seed<N>` when trained with seed N."""
        return variant if seed is None else f"{variant}.seed{seed}"

    def ablation_recipe_flags(self, backbone: str, model: str) -> str:
        """The backbone's recipe flags with the seed of an ablation model named by `seeded`."""
        found = re.search(r"\.seed(\d+)$", model)
        return self.recipe_flags(backbone, seed=int(found[1]) if found else None)

    def ablation_sets(self, variant: str, round_: str) -> list[str]:
        """Training sets of an ablation model: its row's training set, and val pseudo-labelled by
        the main round 1 for a round-2 row (`variant` with or without its seed)."""
        qname, tname = variant.split(".")[:2]
        sets = [f"{self.results}/instructions/{qname}/train-{tname}.jsonl"]
        if round_ == "r2":
            sets.append(f"{self.results}/instructions/{qname}/val.pseudo-r1.jsonl")
        return sets

    def ablation_scoring_sets(self, variant: str, round_: str) -> dict[str, list[str]]:
        """The ablation split's set of an ablation model's queries (with the round's predicted
        element levels when its queries state them)."""
        qname = variant.split(".")[0]
        name = self.ablation["split"]
        if self.variants.uses_element_levels(qname):
            name += f".levels-{round_}"
        return {"seen": [f"{self.results}/instructions/{qname}/{name}.parquet"], "blank": []}

    def ablation_cells(self, task: str) -> list[dict]:
        """(row, backbone, seed, score table) of every model of the table (the seed left out when
        the recipe's: one model per row and backbone, as before seeds were a key)."""
        return [{"row": row, "backbone": b, **({} if seed is None else {"seed": seed}),
                 "scores": f"{self.results}/ablation/scores/{b}/{self.seeded(v, seed)}-{r}/scores.parquet"}
                for row, (v, r) in zip(self.ablation[task], self.ablation_models[task])
                for b in self.members(self.ablation["backbones"], "element") for seed in self.ablation_seeds()]

    # ---- what `snakemake` builds by default ----------------------------------------------

    def all_targets(self) -> list[str]:
        res = self.results
        targets = [f"{res}/metrics/summary.tsv", *self.instruction_targets()]
        for name, backbone in self.backbones.items():
            targets += [f"{res}/models/{name}/{task}-{self.final}" for task in backbone["tasks"]]
        for split in self.config["evaluate"]["splits"]:
            targets += [f"{res}/report/scatter_{split}.png", f"{res}/report/categories_{split}.png"]
        if self.backbones:
            targets.append(f"{res}/report/training_curves.png")
        sub = self.config["submission"]
        targets.append(f"{res}/predictions/{sub['predictor']}/{sub['split']}/submission.zip")
        if sub["predictor"] not in BASELINES and not sub["predictor"].startswith("blank-"):
            targets.append(f"{res}/bundle")  # the submitted models, portable (imatch export)
        targets += [f"{res}/ablation/{table}_{task}.tsv" for task in TASKS if self.ablation[task] and self.backbones
                    for table in ("table", "effects")]
        return targets


SHIPPED = "pretrained"  # the folder of the shipped pretrained tiny backbones, sealed by its manifest.json


def pretrained_file(backbone: dict) -> str:
    """A `source: pretrained` backbone's packed file: its `checkpoint`, else the shipped one of its
    architecture (pretrained/tiny-<arch>.zip)."""
    return backbone.get("checkpoint") or f"{SHIPPED}/tiny-{backbone['arch']}.zip"
