"""The planning decisions of the workflow (imatch.plan) on configs, checked against what the paper
and the config say by hand: which sets each round scores, which models a predictor combines,
which backbones label val, which model an ablation row trains, the exact flags of a recipe.
The Snakemake files only map these to rules (their wiring: the dry-run tests of test_workflow)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from imatch import config_checks
from imatch.plan import Plan, flags

REPO = Path(__file__).resolve().parents[1]


def config(*files: str, **overrides) -> dict:
    cfg, _ = config_checks.load([REPO / "config" / f for f in files], REPO)
    cfg = copy.deepcopy(cfg)
    for path, value in overrides.items():  # "a__b" = cfg["a"]["b"]
        *parents, key = path.split("__")
        node = cfg
        for p in parents:
            node = node[p]
        node[key] = value
    return cfg


def test_flags_turn_settings_into_the_commands_options_in_order():
    assert flags({"batch_size": 8, "compile": False, "share_prefix": True, "lr_scheduler": "cosine"}) == \
        "--batch-size 8 --no-compile --share-prefix --lr-scheduler cosine"
    # lists become one flag with every value, an empty list no flag; values are shell-quoted
    assert flags({"modules_to_save": ["lm_head", "embed tokens"], "metadata": [], "description": "a b'c"}) == \
        "--modules-to-save lm_head 'embed tokens' --description 'a b'\"'\"'c'"


def test_recipe_flags_are_the_sorted_recipe_with_the_backbones_overrides_and_tiles():
    cfg = config("evalmuse.yaml")
    plan = Plan(cfg)
    got = plan.recipe_flags("internvl2_5-8b-mpo").split()
    # evalmuse.yaml: the paper's recipe (Sec. 4.1), InternVL without checkpointing, up to 12 tiles
    for pair in (["--learning-rate", "4e-05"], ["--lora-rank", "16"], ["--batch-size", "8"], ["--grad-accum", "2"],
                 ["--max-pixels", "200704"], ["--max-tiles", "12"]):
        i = got.index(pair[0])
        assert got[i:i + 2] == pair
    assert "--no-gradient-checkpointing" in got and "--gradient-checkpointing" not in got
    assert "--share-prefix" in got and "--train-vit" in got and "--train-aligner" in got
    options = [g for g in got if g.startswith("--") and g != "--max-tiles"]
    assert options == sorted(options, key=lambda o: o.replace("--no-", "--").replace("-", "_")), "sorted by key"
    assert "--max-tiles" not in plan.recipe_flags("qwen2_5-vl-7b")  # Qwen2.5-VL does not tile


def test_ovis2_34b_trains_on_one_gpu_and_its_80_gb_alternative_splits_over_two():
    """evalmuse.yaml: the 34B on one GPU (measured to fit 79 GiB); the alternative its comment gives for
    smaller cards, layers split over two GPUs each capped at 80 GiB, reaches its training command; at
    their defaults the two placement keys stay out of every other job's command (unchanged commands:
    no retraining of finished models)."""
    plan = Plan(config("evalmuse.yaml"))
    assert plan.gpus("ovis2-34b") == 1 and "split-layers" not in plan.recipe_flags("ovis2-34b")
    split = config("evalmuse.yaml")
    split["backbones"][4].update(gpus=2, recipe={"split_layers": True, "gpu_memory_cap": 80})
    got = Plan(split).recipe_flags("ovis2-34b").split()
    assert "--split-layers" in got and got[got.index("--gpu-memory-cap") + 1] == "80"
    assert Plan(split).gpus("ovis2-34b") == 2
    for name in ("internvl2_5-8b-mpo", "qwen2_5-vl-7b", "ovis2-8b", "ovis2-16b"):
        assert "split-layers" not in plan.recipe_flags(name) and "--gpu-memory-cap" not in plan.recipe_flags(name)
        assert plan.gpus(name) == 1
    explicit = config("evalmuse.yaml", train__split_layers=False, train__gpu_memory_cap=0)
    assert Plan(explicit).recipe_flags("ovis2-8b") == plan.recipe_flags("ovis2-8b")
    capped = Plan(config("evalmuse.yaml", train__gpu_memory_cap=79.5)).recipe_flags("ovis2-8b").split()
    assert capped[capped.index("--gpu-memory-cap") + 1] == "79.5" and "--no-split-layers" not in capped


def test_score_flags_take_the_image_budget_from_the_recipe():
    cfg = config()
    cfg["train"]["max_pixels"] = 4096
    cfg["score"].update(batch_size=5, compile=True, share_prefix=False)
    plan = Plan(cfg)
    name = cfg["backbones"][0]["name"]
    assert plan.score_flags(name) == (
        "--batch-size 5 --dtype float32 --device cpu --tau 3 --max-pixels 4096 --workers 0 --compile --no-share-prefix ")


def test_splits_follow_the_holdout_fraction_and_the_test_data(tmp_path):
    assert Plan(config()).available_splits() == ["train", "val", "holdout", "test"]
    assert Plan(config(ingest__holdout_fraction=0, demo__test_prompts=0)).available_splits() == ["train", "val"]
    local = config(data__source="local", data__local_dir=str(tmp_path))
    assert "test" not in Plan(local).available_splits()
    (tmp_path / "final_test.json").write_text("[]")
    assert "test" in Plan(local).available_splits()


def test_each_round_scores_what_its_predictors_and_the_next_round_need():
    plan = Plan(config())  # evaluate holdout+val, blank-ensemble control, submission of the ensemble on test
    assert plan.scored_views("r1") == [("val", "seen")]  # only the pseudo labels of round 2
    assert plan.scored_views("r2") == [("holdout", "blank"), ("holdout", "seen"), ("test", "seen"),
                                       ("val", "blank"), ("val", "seen")]
    # weights fitted on the holdout: the holdout is scored even when only val is evaluated
    cfg = config(ensemble__weights="holdout")
    cfg["evaluate"].update(splits=["val"], predictors=["ensemble"])
    cfg["submission"].update(predictor="prior", split="val")
    assert Plan(cfg).scored_views("r2") == [("holdout", "seen"), ("val", "seen")]
    # one round: nothing to pseudo-label
    cfg["rounds"] = 1
    assert Plan(cfg).scored_views("r1") == [("holdout", "seen"), ("val", "seen")]


def test_overall_queries_state_the_levels_of_their_own_round_and_view():
    plan = Plan(config())
    sets = plan.scoring_sets("overall", "r2")
    assert all(".levels-r2-blank.parquet" in s for s in sets["blank"]) and sets["blank"]
    assert all(s.endswith(".levels-r2.parquet") for s in sets["seen"])
    assert all(".levels-" not in s for s in plan.scoring_sets("element", "r2")["seen"])
    # round 2 trains on train + val pseudo-labelled by round 1 (Eq. 8); round 1 on train only
    r1, r2 = plan.training_sets("element", "r1"), plan.training_sets("element", "r2")
    assert len(r1) == 1 and r2[0] == r1[0] and r2[1].endswith("/val.pseudo-r1.jsonl")


def test_predictors_combine_the_models_the_config_names():
    cfg = config("evalmuse.yaml")
    plan = Plan(cfg)
    element_models = ["internvl2_5-8b-mpo", "qwen2_5-vl-7b", "ovis2-8b", "ovis2-16b"]
    rnd, overall, element, blank, weights = plan.model_predictor("ensemble")
    assert (rnd, blank) == ("r2", False)
    assert set(overall) == {*element_models, "ovis2-34b"} and sorted(element) == sorted(element_models)
    assert plan.model_predictor("blank-ovis2-8b") == ("r2", ["ovis2-8b"], ["ovis2-8b"], True, "mean")
    # Ovis2-34B trains no element model: never an element member by default
    assert "ovis2-34b" not in plan.members([], "element") and "ovis2-34b" in plan.members([], "overall")
    # round 1's ensemble labels val with the pseudo-label backbones, element levels from element_from
    cfg2 = config(pseudo_labels__from=["qwen2_5-vl-7b"], pseudo_labels__element_from=["ovis2-8b"])
    cfg2["backbones"] = cfg["backbones"]
    assert Plan(cfg2).model_predictor("ensemble-r1") == ("r1", ["qwen2_5-vl-7b"], ["ovis2-8b"], False, "mean")
    with pytest.raises(ValueError, match="unknown predictor 'nope'"):
        plan.model_predictor("nope")


def test_weights_fitted_on_the_holdout_never_predict_the_holdout():
    plan = Plan(config(ensemble__weights="holdout"))
    assert plan.predictor_inputs("ensemble", "val")["weights"] == "results/ensemble/r2/weights.json"
    assert "weights" not in plan.predictor_inputs("ensemble", "holdout")
    assert "weights" not in Plan(config()).predictor_inputs("ensemble", "val")


def test_instruction_sets_read_what_their_queries_state():
    plan = Plan(config())
    qname, tname = plan.variants.add("overall", plan.config["instructions"])
    train = plan.instruction_inputs({"query": qname, "train": tname})
    assert train["augmented"].endswith("/augmented.parquet")  # 10 % image augmentation (Sec. 3.3)
    levels = plan.instruction_inputs({"query": qname, "split": "val", "levels": "r1-blank"})
    assert levels["element_levels"] == "results/element_levels/r1-blank.parquet"
    assert plan.instruction_flags({"query": qname, "split": "val", "levels": "r1"}, levels).endswith(
        "--element-levels results/element_levels/r1-blank.parquet")
    with pytest.raises(ValueError, match="states element levels: its val set needs a round"):
        plan.instruction_inputs({"query": qname, "split": "val"})
    # the training set states the ground-truth levels
    assert plan.instruction_flags({"query": qname, "train": tname}, train).endswith("--element-levels ground-truth")


def test_ablation_rows_with_equal_settings_share_a_model_and_validation_rows_train_round_2():
    plan = Plan(config("ablation.yaml"))
    rows, models = plan.config["ablation"]["overall"], plan.ablation_models["overall"]
    assert all((r == "r2") == row["validation"] for row, (_, r) in zip(rows, models))
    # rows differing only in `qalign` (a scoring choice) train the same model
    for i, a in enumerate(rows):
        for j, b in enumerate(rows):
            same = {k: v for k, v in a.items() if k != "qalign"} == {k: v for k, v in b.items() if k != "qalign"}
            assert (models[i] == models[j]) == same, (a, b)
    assert plan.ablation_needs_pseudo()
    cells = plan.ablation_cells("element")
    assert len(cells) == len(plan.config["ablation"]["element"]) * len(plan.members([], "element"))


def test_an_ablation_row_with_metadata_off_trains_on_queries_without_it():
    """`metadata: false` in a row: its model's queries state no annotation metadata, in training and
    in the scored split (no --metadata option); the other rows keep the instructions' fields."""
    plan = Plan(config("ablation.yaml"))
    for task in ("overall", "element"):
        rows, models = plan.config["ablation"][task], plan.ablation_models[task]
        for row, (variant, round_) in zip(rows, models):
            qname, tname = variant.split(".")
            scored = {"query": qname, "split": "holdout"}
            if plan.variants.uses_element_levels(qname):
                scored["levels"] = round_
            for spec in ({"query": qname, "train": tname}, scored):
                options = plan.instruction_flags(spec, plan.instruction_inputs(spec))
                stated = "--metadata attribute_confidence prompt_meaningless split_confidence" in options
                assert stated == row["metadata"], (task, row, options)
        assert [row["metadata"] for row in rows].count(False) == 1


def test_default_targets_export_the_bundle_of_a_model_predictor_only():
    assert "results/bundle" in Plan(config()).all_targets()
    for predictor in ("prior", "blank-ensemble"):
        cfg = config()
        cfg["submission"]["predictor"] = predictor
        assert "results/bundle" not in Plan(cfg).all_targets()
    targets = Plan(config("evalmuse.yaml")).all_targets()
    assert "results/evalmuse/models/ovis2-34b/overall-r2" in targets
    assert "results/evalmuse/models/ovis2-34b/element-r2" not in targets


@pytest.mark.slow  # three dry runs
@pytest.mark.parametrize("name", ["config", "ablation", "evalmuse"])
def test_the_shipped_configs_plan_the_committed_jobs(name):
    """Every job of `snakemake -n -p --forceall` of config/<name>.yaml (rule, data inputs, outputs,
    logs, resources, shell command) equals the committed snapshot (tests/plans.py writes it)."""
    import difflib

    import plans

    got, want = plans.plan(name), plans.committed(name)
    diff = "".join(list(difflib.unified_diff(want.splitlines(True), got.splitlines(True), "committed", "now"))[:60])
    assert got == want, f"the plan of config/{name}.yaml changed (if intended: python tests/plans.py --write):\n{diff}"


def test_the_real_config_compiles_qwen_training_only_where_measured_faster():
    """config/evalmuse.yaml compiles the Qwen2.5-VL-7B training (1.7x on an H200, per-query rows),
    not InternVL2.5's or Ovis2's (InternVL measured 3.4x slower compiled); a config without the key
    (the schema's default, false) keeps its commands: no `--no-compile` that would retrain finished models."""
    plan = Plan(config("evalmuse.yaml"))
    compiled = {b: "--compile" in plan.recipe_flags(b).split() for b in plan.backbones}
    assert compiled == {"internvl2_5-8b-mpo": False, "qwen2_5-vl-7b": True, "ovis2-8b": False,
                        "ovis2-16b": False, "ovis2-34b": False}
    default = Plan(config())
    assert default.recipe("tiny-internvl")["compile"] is False
    assert not any("compile" in default.recipe_flags(b) for b in default.backbones)


def test_ablation_seeds_train_each_row_once_per_seed_with_that_seed():
    """`ablation.seeds: [0, 1, 2]`: three models per row and backbone, named by their seed, each
    trained with `--seed N` (the rest of the recipe unchanged), and the table reads all three;
    without the key a row's model keeps its name and the recipe's seed."""
    import json as _json

    rows = {"overall": [{"qalign": True, "validation": False, "element_levels": False, "image_augmentation": False}],
            "element": [], "split": "holdout", "backbones": [], "seeds": None}
    plain = Plan(config(ablation=rows))
    seeded = Plan(config(ablation={**rows, "seeds": [0, 1, 2]}))
    [cell] = plain.ablation_cells("overall")[:1]
    assert "seed" not in cell and "/ablation/scores/tiny-internvl/overall-" in cell["scores"] and ".seed" not in cell["scores"]
    cells = [c for c in seeded.ablation_cells("overall") if c["backbone"] == "tiny-internvl"]
    assert [c["seed"] for c in cells] == [0, 1, 2]
    models = [c["scores"].split("/")[-2].rsplit("-", 1)[0] for c in cells]
    assert [m.rsplit(".", 1)[1] for m in models] == ["seed0", "seed1", "seed2"]
    for seed, model in zip((0, 1, 2), models):
        got = seeded.ablation_recipe_flags("tiny-internvl", model).split()
        want = plain.recipe_flags("tiny-internvl").split()
        assert got[got.index("--seed") + 1] == str(seed)
        assert got[:got.index("--seed")] == want[:want.index("--seed")]  # nothing else changes
        assert seeded.ablation_sets(model, "r1") == plain.ablation_sets(model.rsplit(".", 1)[0], "r1")
    assert _json.loads(_json.dumps(cells))[2]["seed"] == 2


@pytest.mark.slow  # a dry run
def test_snakemake_plans_every_seed_of_every_ablation_row(tmp_path):
    """The workflow itself (`snakemake -n -p`, config/ablation.yaml with `seeds: [0, 1]`): twice the
    ablation trainings of the plain run, each model's `--seed` the one in its name, and the tables
    wait for all of them."""
    import re
    import subprocess
    import sys

    seeds = tmp_path / "seeds.yaml"
    seeds.write_text("ablation:\n  seeds: [0, 1]\n")

    def dry_run(*configs):
        return subprocess.run([sys.executable, "-m", "snakemake", "-n", "-p", "--forceall", "--configfile",
                               "config/ablation.yaml", *configs, "--config", "results=results/plan"],
                              capture_output=True, text=True, check=True, cwd=REPO).stdout

    def trainings(out):
        lines = (line.removeprefix("Shell command: ") for line in out.splitlines())
        return [line for line in lines if line.startswith("imatch train ") and "/ablation/models/" in line]

    plain, seeded = trainings(dry_run()), trainings(dry_run(str(seeds)))
    assert len(plain) > 0 and len(seeded) == 2 * len(plain)
    for line in seeded:
        name = re.search(r"--out \S+/ablation/models/\S+\.seed(\d+)-r\d+ ", line)
        assert name and f" --seed {name[1]} " in line, line
    assert {re.search(r"--seed (\d+)", line)[1] for line in seeded} == {"0", "1"}
