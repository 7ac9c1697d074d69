"""The ablation tables (paper Tables 4 and 5): the judge's metrics of each row's scores."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from imatch import levels
from imatch.ablation import ablation_effects, ablation_table


def score_table(samples, elements, split, task, expected, argmax=None):
    """A model's score table (as gather-scores writes it) for one split, seen images."""
    s = samples[samples["split"] == split]
    if task == "overall":
        t = pd.DataFrame({"id": s["img_path"], "img_path": s["img_path"], "element": None})
    else:
        e = elements[elements["img_path"].isin(s["img_path"])]
        t = pd.DataFrame({"id": e["img_path"] + "|" + e["element"], "img_path": e["img_path"], "element": e["element"]})
    t = t.assign(task=task, split=split, view="seen", expected_level=expected,
                 argmax_level=argmax if argmax is not None else np.rint(expected).astype(int))
    # other splits and the grey-image view are in the same table and must be ignored
    return pd.concat([t, t.assign(view="blank", expected_level=1.0)], ignore_index=True)


def test_rows_get_the_judges_metrics_and_qalign_reads_the_expectation(ingested, tmp_path):
    """SRCC (scipy) and PLCC (the challenge's logistic, written from its description in
    test_evaluate) of noisy expected levels; qalign false reads the argmax column instead. The
    score table's rows are shuffled, so values must be joined to the images by id."""
    from test_evaluate import official_plcc

    samples, elements = (pd.read_parquet(p) for p in ingested)
    truth = samples.loc[samples["split"] == "holdout", "total_score"].to_numpy()
    rng = np.random.default_rng(7)
    level = np.clip((truth - 1) / 4 * 14 + 1 + rng.normal(0, 3, len(truth)), 1, 15)  # a noisy expectation
    argmax = np.arange(len(level)) % 15 + 1  # beside an unrelated argmax
    overall = tmp_path / "overall.parquet"
    table = score_table(samples, elements, "holdout", "overall", level, argmax=argmax)
    table.sample(frac=1, random_state=3).to_parquet(overall)
    e = elements[elements["img_path"].isin(samples.loc[samples["split"] == "holdout", "img_path"])]
    hits = e["score"].to_numpy() >= 0.5
    element = tmp_path / "element.parquet"
    flipped = hits.copy()
    flipped[:4] = ~flipped[:4]  # four wrong hits
    score_table(samples, elements, "holdout", "element", np.where(flipped, 6.0, 2.0)).sample(frac=1, random_state=4).to_parquet(element)

    flags = {"validation": False, "element_levels": False, "image_augmentation": False}
    plan = [{"row": {**flags, "qalign": q}, "backbone": "m", "scores": str(overall)} for q in (True, False)]
    table = ablation_table("overall", plan, *ingested, "holdout", tau=3)
    assert list(table.columns) == ["qalign", "validation", "element_levels", "image_augmentation", "m srcc", "m plcc"]
    with_qalign, without = table.iloc[0], table.iloc[1]
    total = levels.level_to_total(level)
    assert with_qalign["m srcc"] == pytest.approx(spearmanr(truth, total)[0], abs=1e-12)
    assert with_qalign["m plcc"] == pytest.approx(official_plcc(truth, total), abs=1e-6)
    assert 0.3 < with_qalign["m srcc"] < 0.95  # neither perfect nor unrelated
    argmax_total = levels.level_to_total(argmax)
    assert without["m srcc"] == pytest.approx(spearmanr(truth, argmax_total)[0], abs=1e-12)
    assert without["m plcc"] == pytest.approx(official_plcc(truth, argmax_total), abs=1e-6)

    plan = [{"row": {"prompt_type": True, "score_perturbation": False}, "backbone": b, "scores": str(element)}
            for b in ("a", "b")]
    table = ablation_table("element", plan, *ingested, "holdout", tau=3)
    assert table.loc[0, "a acc"] == pytest.approx(1 - 4 / len(hits)) and table.loc[0, "b acc"] == table.loc[0, "a acc"]
    assert table.loc[0, "ensemble acc"] == table.loc[0, "a acc"]  # the mean of two equal models


def test_a_split_the_model_did_not_score_is_an_error(ingested, tmp_path):
    samples, elements = (pd.read_parquet(p) for p in ingested)
    path = tmp_path / "val_only.parquet"
    n = int((samples["split"] == "val").sum())
    score_table(samples, elements, "val", "overall", np.full(n, 8.0)).to_parquet(path)
    row = {"qalign": True, "validation": False, "element_levels": False, "image_augmentation": False}
    with pytest.raises(Exception, match="were not scored"):
        ablation_table("overall", [{"row": row, "backbone": "m", "scores": str(path)}], *ingested, "holdout", tau=3)


def test_seeds_give_each_metric_its_mean_and_sample_sd_over_the_seeds(ingested, tmp_path):
    """`ablation.seeds`: one model per seed; the table's value is the mean over the seeds of the
    judge's metric of each, `sd` their sample standard deviation, recomputed here with scipy."""
    samples, elements = (pd.read_parquet(p) for p in ingested)
    truth = samples.loc[samples["split"] == "holdout", "total_score"].to_numpy()
    rng = np.random.default_rng(0)
    flags = {"qalign": True, "validation": False, "element_levels": False, "image_augmentation": False}
    plan, srcc = [], []
    for seed in (0, 1, 2):  # three models of one row: the truth with more or less noise
        level = np.clip((truth - 1) / 4 * 14 + 1 + rng.normal(0, 2 + 2 * seed, len(truth)), 1, 15)
        path = tmp_path / f"s{seed}.parquet"
        score_table(samples, elements, "holdout", "overall", level).to_parquet(path)
        plan.append({"row": flags, "backbone": "m", "seed": seed, "scores": str(path)})
        srcc.append(spearmanr(truth, levels.level_to_total(level))[0])
    table = ablation_table("overall", plan, *ingested, "holdout", tau=3)
    assert list(table.columns) == [*flags, "m srcc", "m srcc sd", "m plcc", "m plcc sd", "seeds"]
    assert len(table) == 1 and table.loc[0, "seeds"] == "0 1 2"
    assert table.loc[0, "m srcc"] == pytest.approx(np.mean(srcc), abs=1e-12)
    assert table.loc[0, "m srcc sd"] == pytest.approx(np.std(srcc, ddof=1), abs=1e-12) and table.loc[0, "m srcc sd"] > 0.01


def test_a_row_listed_twice_does_not_shrink_its_seed_spread(ingested, tmp_path):
    """The same row twice in the config (the same models): its sd is that of its seeds, not of the
    seeds counted twice."""
    samples, elements = (pd.read_parquet(p) for p in ingested)
    truth = samples.loc[samples["split"] == "holdout", "total_score"].to_numpy()
    flags = {"qalign": True, "validation": False, "element_levels": False, "image_augmentation": False}
    plan = []
    for seed, noise in ((0, 1.0), (1, 6.0)):
        level = np.clip((truth - 1) / 4 * 14 + 1 + np.random.default_rng(seed).normal(0, noise, len(truth)), 1, 15)
        path = tmp_path / f"s{seed}.parquet"
        score_table(samples, elements, "holdout", "overall", level).to_parquet(path)
        plan.append({"row": flags, "backbone": "m", "seed": seed, "scores": str(path)})
    once = ablation_table("overall", plan, *ingested, "holdout", tau=3)
    twice = ablation_table("overall", plan + plan, *ingested, "holdout", tau=3)
    assert once.loc[0, "m srcc sd"] > 0 and twice.loc[0, "m srcc sd"] == pytest.approx(once.loc[0, "m srcc sd"])


def test_effects_pair_the_seeds_and_say_whether_the_papers_direction_holds(ingested, tmp_path):
    """Two rows (element levels off / on) x three seeds x two backbones: each effect is the mean of
    the per-seed differences of the judge's SRCC, its sd and a paired t-test recomputed here with
    scipy; a change far larger than the seeds' spread "holds", a change of a few ranks is "within
    noise"; ensembling is the SRCC of the backbones' mean level minus the mean of their SRCCs."""
    from scipy.stats import ttest_rel

    samples, elements = (pd.read_parquet(p) for p in ingested)
    truth = samples.loc[samples["split"] == "holdout", "total_score"].to_numpy()
    perfect = (truth - 1) / 4 * 14 + 1
    off = {"qalign": True, "validation": False, "element_levels": False, "image_augmentation": False}
    on = {**off, "element_levels": True}
    noise = {"a": {False: 8.0, True: 1.0}, "b": {False: 4.0, True: 4.0}}  # a improves, b does not
    plan, level, srcc = [], {}, {}
    for b in ("a", "b"):
        for row in (off, on):
            for seed in (0, 1, 2):
                rng = np.random.default_rng([seed, row["element_levels"], ord(b)])
                lv = np.clip(perfect + rng.normal(0, noise[b][row["element_levels"]], len(truth)), 1, 15)
                path = tmp_path / f"{b}-{row['element_levels']}-{seed}.parquet"
                score_table(samples, elements, "holdout", "overall", lv).to_parquet(path)
                plan.append({"row": row, "backbone": b, "seed": seed, "scores": str(path)})
                level[b, row["element_levels"], seed] = lv
                srcc[b, row["element_levels"], seed] = spearmanr(truth, levels.level_to_total(lv))[0]
    effects = ablation_effects("overall", plan, *ingested, "holdout", tau=3)

    row = effects[(effects["component"] == "element_levels") & (effects["metric"] == "srcc")].set_index("model")
    assert set(row.index) == {"a", "b", "ensemble"} and (row["from"] == "qalign").all()
    assert (row["to"] == "qalign+element_levels").all()
    for b in ("a", "b"):
        before = [srcc[b, False, s] for s in range(3)]
        after = [srcc[b, True, s] for s in range(3)]
        diff = np.subtract(after, before)
        assert row.loc[b, "effect"] == pytest.approx(diff.mean(), abs=1e-12)
        assert row.loc[b, "sd"] == pytest.approx(diff.std(ddof=1), abs=1e-12) and row.loc[b, "seeds"] == 3
        assert row.loc[b, "p"] == pytest.approx(ttest_rel(after, before).pvalue, rel=1e-9)
    assert row.loc["a", "verdict"] == "holds" and row.loc["a", "effect"] > 0.2
    assert row.loc["b", "verdict"] == "within noise"

    ens = effects[(effects["component"] == "ensembling") & (effects["metric"] == "srcc")].set_index("to")
    for flag, label in ((False, "qalign"), (True, "qalign+element_levels")):
        mean_members = [np.mean([srcc["a", flag, s], srcc["b", flag, s]]) for s in range(3)]
        ensemble = [spearmanr(truth, levels.level_to_total((level["a", flag, s] + level["b", flag, s]) / 2))[0]
                    for s in range(3)]
        assert ens.loc[label, "effect"] == pytest.approx(np.mean(np.subtract(ensemble, mean_members)), abs=1e-12)
        assert ens.loc[label, "p"] == pytest.approx(ttest_rel(ensemble, mean_members).pvalue, rel=1e-9)


def test_one_seed_gives_an_effect_without_a_verdict(ingested, tmp_path):
    samples, elements = (pd.read_parquet(p) for p in ingested)
    truth = samples.loc[samples["split"] == "holdout", "total_score"].to_numpy()
    plan, srcc = [], []
    for flag, lv in ((False, np.full(len(truth), 8.0)), (True, (truth - 1) / 4 * 14 + 1)):
        lv = lv + np.arange(len(truth)) * 1e-6  # the constant row: the images' order, no ties
        srcc.append(spearmanr(truth, levels.level_to_total(lv))[0])
        path = tmp_path / f"{flag}.parquet"
        score_table(samples, elements, "holdout", "overall", lv).to_parquet(path)
        plan.append({"row": {"qalign": True, "validation": False, "element_levels": False, "image_augmentation": flag},
                     "backbone": "m", "scores": str(path)})
    effects = ablation_effects("overall", plan, *ingested, "holdout", tau=3)
    srcc_of, srcc = srcc, effects[effects["metric"] == "srcc"].iloc[0]
    assert srcc["component"] == "image_augmentation" and srcc["verdict"] == "one seed" and srcc["seeds"] == 1
    assert srcc["effect"] == pytest.approx(srcc_of[1] - srcc_of[0], abs=1e-12) and srcc["effect"] > 0.5


def test_a_metadata_row_becomes_a_column_and_a_component_through_the_command(ingested, tmp_path):
    """`imatch ablation-table --effects` as the workflow runs it: a row with metadata off adds a
    metadata column (true for the others) and a metadata effect from that row to its twin; the
    rows are labelled by their switches that are on."""
    import json
    import subprocess
    import sys

    samples, elements = (pd.read_parquet(p) for p in ingested)
    truth = samples.loc[samples["split"] == "holdout", "total_score"].to_numpy()
    perfect = (truth - 1) / 4 * 14 + 1
    plan = []
    for metadata, level in ((True, perfect), (False, 16 - perfect)):
        path = tmp_path / f"{metadata}.parquet"
        score_table(samples, elements, "holdout", "overall", level).to_parquet(path)
        row = {"qalign": True, "validation": True, "element_levels": False, "image_augmentation": False}
        plan.append({"row": {**row, "metadata": metadata} if not metadata else row, "backbone": "m", "scores": str(path)})
    out, effects = tmp_path / "table.tsv", tmp_path / "effects.tsv"
    subprocess.run([sys.executable, "-m", "imatch", "ablation-table", "--kind", "overall", "--plan", json.dumps(plan),
                    "--samples", str(ingested[0]), "--elements", str(ingested[1]), "--split", "holdout",
                    "--out", str(out), "--effects", str(effects)], check=True, capture_output=True)
    table = pd.read_csv(out, sep="\t")
    assert list(table["metadata"]) == [True, False]
    effect = pd.read_csv(effects, sep="\t").set_index("metric")
    assert effect.loc["srcc", "component"] == "metadata"
    assert (effect.loc["srcc", "from"], effect.loc["srcc", "to"]) == ("qalign+validation", "qalign+validation+metadata")
    assert effect.loc["srcc", "effect"] == pytest.approx(table.loc[0, "m srcc"] - table.loc[1, "m srcc"], abs=2e-4)
    assert effect.loc["srcc", "effect"] > 0


def test_an_effect_on_a_metric_without_a_value_is_undefined_not_reversed(ingested, tmp_path):
    """Constant predictions have no SRCC (nan): an effect from or to them has no direction."""
    samples, elements = (pd.read_parquet(p) for p in ingested)
    truth = samples.loc[samples["split"] == "holdout", "total_score"].to_numpy()
    plan = []
    for seed in (0, 1, 2):
        for flag, lv in ((False, np.full(len(truth), 8.0)), (True, (truth - 1) / 4 * 14 + 1 + seed * 0.01)):
            path = tmp_path / f"{flag}-{seed}.parquet"
            score_table(samples, elements, "holdout", "overall", lv).to_parquet(path)
            plan.append({"row": {"qalign": True, "validation": False, "element_levels": False, "image_augmentation": flag},
                         "backbone": "m", "seed": seed, "scores": str(path)})
    srcc = ablation_effects("overall", plan, *ingested, "holdout", tau=3).query("metric == 'srcc'").iloc[0]
    assert np.isnan(srcc["effect"]) and srcc["verdict"] == "undefined"
