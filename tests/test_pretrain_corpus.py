"""The pretraining corpus: every answer and caption is true of the pixels (read back from the PNGs,
not from the generator), yes/no answers are balanced, the same seed gives the same bytes, no image
is one of the demo data's, rows have ms-swift's shape, and bad arguments are named."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage

from imatch import cli, demo_data, pretrain_corpus

SHAPES = ["circle", "square", "triangle", "star", "ring"]
COLOURS = list(demo_data.COLOURS)
WORDS = {"colour": set(COLOURS), "shape": set(SHAPES), "count": {"zero", "one", "two", "three", "four"},
         "position": {"left", "right", "top", "bottom"}, "relation": {"yes", "no", *SHAPES}, "presence": {"yes", "no"},
         "has_shape": {"yes", "no"}, "has_colour": {"yes", "no"}, "in_context": {"yes", "no"}}
NUMBERS = {w: n for n, w in enumerate(["zero", "one", "two", "three", "four"])} | {"a": 1}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus") / "c"
    pretrain_corpus.generate(out, seed=7, n_scenes=60, image_size=128, single_attribute=True, instruction_forms=True)
    return out


# ---- perception from the pixels alone -------------------------------------------------------------

def _shape_of(mask: np.ndarray) -> str:
    """Classify one connected region by its form: a hole (ring), how much of its box it fills
    (square ~1, circle ~0.78), a full bottom row (triangle) or not (star)."""
    if ndimage.binary_fill_holes(mask).sum() > mask.sum():
        return "ring"
    fill = mask.mean()
    if fill > 0.9:
        return "square"
    if fill > 0.65:
        return "circle"
    return "triangle" if mask[-1].mean() > 0.8 else "star"


def perceive(path: Path) -> list[dict]:
    """The objects of an image: one per connected region of a palette colour."""
    pixels = np.asarray(Image.open(path).convert("RGB"))
    objects = []
    for colour, rgb in demo_data.COLOURS.items():
        labels, _ = ndimage.label((pixels == rgb).all(-1), structure=np.ones((3, 3)))
        for k, box in enumerate(ndimage.find_objects(labels), start=1):
            objects.append({"colour": colour, "shape": _shape_of(labels[box] == k),
                            "x0": box[1].start, "x1": box[1].stop - 1, "y0": box[0].start, "y1": box[0].stop - 1})
    return objects


def _pick(objects, colour=None, shape=None):
    return [o for o in objects if (colour is None or o["colour"] == colour) and (shape is None or o["shape"] == shape)]


def _holds(a: list[dict], b: list[dict], rel: str) -> bool:
    """Every object of a lies entirely `rel` every object of b."""
    return bool(a and b) and {
        "left of": max(o["x1"] for o in a) < min(o["x0"] for o in b),
        "right of": min(o["x0"] for o in a) > max(o["x1"] for o in b),
        "above": max(o["y1"] for o in a) < min(o["y0"] for o in b),
        "below": min(o["y0"] for o in a) > max(o["y1"] for o in b)}[rel]


def _singular(word: str) -> str:
    return word[:-1] if word.endswith("s") else word


C, S, R = "|".join(COLOURS), "|".join(SHAPES), "left of|right of|above|below"


def truth(question: str, objects: list[dict], size: int) -> str:
    """The answer to a corpus question, worked out from the perceived objects."""
    if m := re.fullmatch(rf"What colou?r (?:is|are) the ({S})s?\?", question):
        colours = {o["colour"] for o in _pick(objects, shape=m[1])}
        assert len(colours) == 1, (question, colours)
        return colours.pop()
    if m := re.fullmatch(rf"What shape (?:is|are) the ({C}) objects?\?", question):
        shapes = {o["shape"] for o in _pick(objects, colour=m[1])}
        assert len(shapes) == 1, (question, shapes)
        return shapes.pop()
    if m := re.fullmatch(rf"How many ({S})s are there\?", question):
        return list(NUMBERS)[len(_pick(objects, shape=m[1]))]
    if m := re.fullmatch(rf"How many ({C}) objects are there\?", question):
        return list(NUMBERS)[len(_pick(objects, colour=m[1]))]
    if m := re.fullmatch(rf"(?:Is|Are) the ({C}) ({S})s? (on the left or on the right|at the top or at the bottom)\?", question):
        group = _pick(objects, m[1], m[2])
        lo, hi = ("x0", "x1") if "left" in m[3] else ("y0", "y1")
        first, second = ("left", "right") if "left" in m[3] else ("top", "bottom")
        if max(o[hi] for o in group) < size / 2:
            return first
        assert min(o[lo] for o in group) >= size / 2, question
        return second
    if m := re.fullmatch(rf"(?:Is|Are) the ({C}) ({S})s? ({R}) the ({C}) ({S})s?\?", question):
        a, b = _pick(objects, m[1], m[2]), _pick(objects, m[4], m[5])
        return "yes" if _holds(a, b, m[3]) else "no"
    if m := re.fullmatch(rf"What shape is ({R}) the ({C}) ({S})s?\?", question):
        b = _pick(objects, m[2], m[3])
        groups = {(o["colour"], o["shape"]) for o in objects} - {(m[2], m[3])}
        found = [g for g in groups if _holds(_pick(objects, *g), b, m[1])]
        assert len(found) == 1, (question, found)
        return found[0][1]
    if m := re.fullmatch(rf"Is there a ({C}) ({S})\?", question):
        return "yes" if _pick(objects, m[1], m[2]) else "no"
    if m := re.fullmatch(rf"Is there a ({S})\?", question):
        return "yes" if _pick(objects, shape=m[1]) else "no"
    if m := re.fullmatch(rf"Is there anything ({C})\?", question):
        return "yes" if _pick(objects, colour=m[1]) else "no"
    if m := re.fullmatch(rf"(?:Caption: |Text: )?[^\n]+\n(?:Attribute|Item|Check): (?:({C}) \(color\)|({S}) \(object\))\n"
                         r"(?:Is this attribute in the image|Does the image show this item|Is it visible in the image)"
                         r"\? Answer yes or no\.", question):
        return "yes" if _pick(objects, colour=m[1], shape=m[2]) else "no"
    raise AssertionError(f"no checker for {question!r}")


# ---- tests -----------------------------------------------------------------------------------------

def test_every_answer_is_true_of_the_pixels(corpus):
    table = pd.read_parquet(corpus / "corpus.parquet")
    seen = {}
    for r in table[table["type"] != "caption"].itertuples():
        objects = seen.setdefault(r.image, perceive(corpus / r.image))
        assert r.answer in WORDS[r.type], r  # one word from the type's closed set
        assert truth(r.query.removeprefix("<image>"), objects, 128) == r.answer, (r.image, r.query, r.answer)
    assert set(table["type"]) == set(pretrain_corpus.QUESTION_TYPES + pretrain_corpus.SINGLE_ATTRIBUTE_TYPES
                                     + pretrain_corpus.INSTRUCTION_TYPES)
    assert set(table.loc[table["type"] == "relation", "answer"]) > {"yes", "no"}  # "what shape is ..." too


def test_each_caption_lists_exactly_what_is_drawn_and_every_relation(corpus):
    table = pd.read_parquet(corpus / "corpus.parquet")
    captions = table[table["type"] == "caption"]
    assert len(captions) == 60 and captions["scene"].is_unique
    for r in captions.itertuples():
        objects = perceive(corpus / r.image)
        first, *relations = re.split(r"(?<=\.) ", r.answer)
        named = re.findall(rf"\b(a|two|three|four) ({C}) ({S})s?\b", first.lower())
        drawn = {(o["colour"], o["shape"]) for o in objects}
        assert {(c, s) for _, c, s in named} == drawn and len(named) == len(drawn), (r.image, r.answer)
        for n, c, s in named:
            assert len(_pick(objects, c, s)) == NUMBERS[n], (r.image, r.answer)
        said = set()
        for sentence in relations:
            m = re.fullmatch(rf"The ({C}) ({S})s? (?:is|are) ((?:(?:{R})(?: and )?)+) the ({C}) ({S})s?\.", sentence)
            assert m, sentence
            for rel in re.findall(R, m[3]):
                assert _holds(_pick(objects, m[1], m[2]), _pick(objects, m[4], m[5]), rel), (r.image, sentence)
                said.add(frozenset([(m[1], m[2]), (m[4], m[5])]))
        pairs = {frozenset([g, h]) for g in drawn for h in drawn if g != h
                 and any(_holds(_pick(objects, *g), _pick(objects, *h), rel) for rel in R.split("|"))}
        assert said == pairs, (r.image, r.answer)  # every relation that holds is in the caption


def test_yes_and_no_are_balanced_in_every_scene(corpus):
    table = pd.read_parquet(corpus / "corpus.parquet")
    yes_no = table[table["answer"].isin(["yes", "no"])]
    per_scene = yes_no.groupby(["scene", "type"])["answer"].agg(lambda a: (a == "yes").sum() - (a == "no").sum())
    assert (per_scene == 0).all()
    assert (yes_no["answer"] == "yes").sum() >= 60  # presence in every scene, relations in many
    first = yes_no.groupby(["scene", "type"])["answer"].first()
    assert 0.3 < (first == "yes").mean() < 0.7  # the order within a pair does not give the answer away


def test_same_seed_same_bytes_and_a_scene_does_not_depend_on_the_corpus_size(tmp_path):
    def digest(folder):
        return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file()}

    for name, seed, n in (("a", 3, 12), ("b", 3, 12), ("c", 4, 12), ("d", 3, 5)):
        pretrain_corpus.generate(tmp_path / name, seed=seed, n_scenes=n, image_size=64)
    a, b, c, d = (digest(tmp_path / x) for x in "abcd")
    assert a == b and len(a) == 12 + 3
    assert all(a[k] != c[k] for k in a)
    assert all(a[k] == d[k] for k in d if k.startswith("images/"))
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["sha256"]["corpus.jsonl"] == a["corpus.jsonl"]
    assert summary["namespace"] == pretrain_corpus.NAMESPACE


def test_no_image_is_one_of_the_demo_data_s_of_the_same_seed(tmp_path):
    for seed in (0, 1):
        demo_data.generate(tmp_path / f"demo{seed}", seed=seed, n_train_prompts=10, n_val_prompts=2,
                           n_test_prompts=2, image_size=64, layout="folder")
        pretrain_corpus.generate(tmp_path / f"corpus{seed}", seed=seed, n_scenes=60, image_size=64)

    def pixels(folder):
        return {hashlib.sha256(np.asarray(Image.open(p).convert("RGB")).tobytes()).hexdigest()
                for p in folder.rglob("*.png")}

    demo = pixels(tmp_path / "demo0") | pixels(tmp_path / "demo1")
    ours = pixels(tmp_path / "corpus0") | pixels(tmp_path / "corpus1")
    assert len(demo) == 2 * 14 * len(demo_data.T2I_MODELS) and len(ours) == 120 and not demo & ours
    # nothing score-like: only questions and words, no numbers in any answer
    table = pd.read_parquet(tmp_path / "corpus0" / "corpus.parquet")
    assert list(table.columns) == ["id", "scene", "image", "type", "query", "answer"]
    assert not table["answer"].str.contains(r"\d").any()


def test_rows_have_ms_swift_s_shape_and_match_the_table(corpus):
    table = pd.read_parquet(corpus / "corpus.parquet")
    lines = (corpus / "corpus.jsonl").read_text().splitlines()
    assert len(lines) == len(table)
    for line, r in zip(lines, table.itertuples()):
        row = json.loads(line)
        assert row == {"messages": [{"role": "user", "content": r.query}, {"role": "assistant", "content": r.answer}],
                       "images": [r.image]}
        assert r.query.count("<image>") == 1 and r.query.startswith("<image>")
        assert not Path(r.image).is_absolute() and (corpus / r.image).is_file()
    summary = json.loads((corpus / "summary.json").read_text())
    assert summary["rows"] == len(table) and summary["scenes"] == 60
    assert summary["per_type"] == table["type"].value_counts().to_dict() | {}
    assert summary["answers"]["presence"] == {"no": 60, "yes": 60}
    assert summary["answers"]["has_shape"] == summary["answers"]["has_colour"] == {"no": 60, "yes": 60}


@pytest.mark.parametrize("flag, value", [("--scenes", "0"), ("--scenes", "many"), ("--image-size", "32")])
def test_a_bad_argument_is_named_and_nothing_is_written(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exc:
        cli.main(["pretrain-corpus", "--out", str(tmp_path / "c"), flag, value])
    assert exc.value.code == 2
    assert f"argument {flag}: {flag} must be" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_killed_run_leaves_nothing(tmp_path, monkeypatch):
    real = pretrain_corpus._draw
    calls = []

    def dies(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(pretrain_corpus, "_draw", dies)
    with pytest.raises(KeyboardInterrupt):
        pretrain_corpus.generate(tmp_path / "c", seed=1, n_scenes=5, image_size=64)
    assert list(tmp_path.iterdir()) == []


def test_the_demo_data_bytes_are_unchanged_by_the_shared_drawing_code(tmp_path):
    """demo_data's grid and background became helpers that this corpus shares; the demo data set's
    bytes must stay what they were (hash taken before the change, at commit 58e5f51)."""
    out = tmp_path / "demo"
    demo_data.generate(out, seed=3, n_train_prompts=20, n_val_prompts=5, n_test_prompts=5, image_size=64, layout="folder")
    h = hashlib.sha256()
    for p in sorted(out.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(out)).encode())
            h.update(p.read_bytes())
    assert h.hexdigest() == "9feb526f261a5b717126a384d7202fa8372a6b8f0959e4116b098f474ea20aef"


def test_the_bytes_do_not_depend_on_the_python_process_and_single_attribute_rows_only_add(tmp_path):
    """The same seed in two Python processes with other str hashing (PYTHONHASHSEED) writes the same
    bytes: iterating a set of shape names made the "no" of the presence pairs, and so the corpus the
    shipped backbones were pretrained on, depend on the process (found 2026-12-01). And
    --single-attribute adds its rows without changing a byte of the others."""
    import os
    import subprocess
    import sys

    workflow = Path(pretrain_corpus.__file__).parents[1]
    digests = []
    variants = (("0", []), ("1", []), ("2", ["--single-attribute"]), ("3", ["--single-attribute", "--instruction-forms"]))
    for k, (hash_seed, extra) in enumerate(variants):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(workflow)}
        subprocess.run([sys.executable, "-m", "imatch", "pretrain-corpus", "--out", str(tmp_path / f"c{k}"), "--seed", "1",
                        "--scenes", "150", *extra], env=env, check=True, capture_output=True)
        digests.append(hashlib.sha256((tmp_path / f"c{k}" / "corpus.jsonl").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    plain = pd.read_parquet(tmp_path / "c0" / "corpus.parquet")
    both = pd.read_parquet(tmp_path / "c2" / "corpus.parquet")
    assert set(plain["type"]) == set(pretrain_corpus.QUESTION_TYPES)
    kept = both[~both["type"].isin(pretrain_corpus.SINGLE_ATTRIBUTE_TYPES)].reset_index(drop=True)
    assert kept.drop(columns="id").equals(plain.drop(columns="id"))  # ids count the scene's questions
    assert (both["type"].isin(pretrain_corpus.SINGLE_ATTRIBUTE_TYPES)).sum() == 4 * 150
    for k in range(150):
        name = f"images/{k:06d}.png"
        assert (tmp_path / "c0" / name).read_bytes() == (tmp_path / "c2" / name).read_bytes()
        assert (tmp_path / "c2" / name).read_bytes() == (tmp_path / "c3" / name).read_bytes()
    # --instruction-forms adds its pair after all other rows of a scene, which keep their bytes
    forms = pd.read_parquet(tmp_path / "c3" / "corpus.parquet")
    added = forms["type"].isin(pretrain_corpus.INSTRUCTION_TYPES)
    assert forms[~added].reset_index(drop=True).equals(both)
    assert added.sum() == 2 * 150


def test_the_instruction_context_says_nothing_about_the_image(corpus):
    """The context line of an in_context question is the caption of a scene that was not drawn: the
    attribute asked about is named in it as often when the answer is "no" as when it is "yes" (with
    this scene's own caption it would be named in every "yes" and no "no"), and the three forms and
    both kinds of attribute occur."""
    table = pd.read_parquet(corpus / "corpus.parquet")
    captions = table[table["type"] == "caption"].set_index("scene")["answer"]
    rows = table[table["type"] == "in_context"]
    lines = rows["query"].str.removeprefix("<image>").str.split("\n")
    context = lines.str[0].str.replace(r"^(Caption|Text): ", "", regex=True)
    attribute = lines.str[1].str.extract(r": (\w+) \((?:color|object)\)$")[0]
    assert attribute.notna().all()
    assert (context != rows["scene"].map(captions)).all()
    named = pd.Series([a in c.lower() for a, c in zip(attribute, context)], index=rows.index)
    by_answer = named.groupby(rows["answer"]).mean()
    assert abs(by_answer["yes"] - by_answer["no"]) < 0.25, by_answer
    assert set(lines.str[2]) == {f.split("\n")[2] for f in pretrain_corpus.INSTRUCTION_FORMS}
    assert set(lines.str[1].str.extract(r"\((color|object)\)$")[0]) == {"color", "object"}
