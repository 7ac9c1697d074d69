"""Stage `pretrain-corpus`: a synthetic captions-and-questions corpus to pretrain the tiny backbones.

Why: a 15-level alignment score is too sparse a signal to teach a randomly initialised VLM to see
(issue 19). Real VLMs learn perception from captions and visual questions before anyone fine-tunes
them for alignment; this corpus gives the tiny backbones the same start, in the demo's own visual
world. Each scene is drawn with the demo generator's drawing code (`demo_data`: its colours,
shapes, grid and `_draw_shape`), exactly as specified (no simulated T2I errors), and comes with a
caption that describes all that was drawn and short-answer questions about colour, shape, count,
position, relation and presence (of a colour and a shape together; with `--single-attribute` also
of a shape alone and of a colour alone, what the demo's elements ask; with `--instruction-forms`
also one attribute asked inside an instruction: a context line, the attribute as "blue (color)" /
"circle (object)", an answer instruction). Answers are single words
where possible (dense targets); the yes/no questions come in pairs, one "yes" and one "no" about
the same image, so they are balanced.

Disjoint from the demo data: scene k of seed S is drawn from
`np.random.default_rng([NAMESPACE, S, k])`, a random stream that `demo_data` (which seeds
`default_rng(S)`) never uses, for any S; there are no alignment scores, levels or element labels.

Output (the folder is written atomically): `images/<scene>.png`, `corpus.jsonl` (ms-swift rows:
`messages` user "<image>question" / assistant answer, `images` [path]), `corpus.parquet` (the same
rows with their scene, question type and answer), `summary.json` (counts per question type, the
answer distribution per type, the seed and namespace, the files' sha256). Image paths are relative
to the folder, so a seed gives the same bytes wherever the corpus is written; ms-swift resolves a
relative path against its working directory, so a trainer runs in the folder or makes them absolute.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from imatch import demo_data
from imatch.atomic import atomic_path, write_json, write_parquet

# The random stream's namespace: sha256("imatch.pretrain_corpus") cut to 63 bits. demo_data seeds
# default_rng(seed), i.e. SeedSequence(seed); SeedSequence([NAMESPACE, seed, k]) is another stream.
NAMESPACE = int.from_bytes(hashlib.sha256(b"imatch.pretrain_corpus").digest()[:8], "big") >> 1
FORMAT = "imatch-pretrain-corpus/1"
MIN_IMAGE_SIZE = 64  # a grid cell of 16 px: a shape of 8 px still has its form
MAX_JITTER = 4  # shapes never touch one another or the border (demo_data allows cell // 6)
NUMBER_WORDS = ["zero", "one", "two", "three", "four"]
SHAPE_WORDS = {s: s.split(" (")[0] for s in demo_data.SHAPES}  # "ring (donut)" -> "ring"
RELATION_WORDS = ["left of", "right of", "above", "below"]
CAPTION_QUERIES = ["Describe the image.", "What does the picture show?", "Write a caption for this image."]
QUESTION_TYPES = ["caption", "colour", "shape", "count", "position", "relation", "presence"]
# with --single-attribute: presence of one attribute alone, what the demo's elements ask ("circle (object)")
SINGLE_ATTRIBUTE_TYPES = ["has_shape", "has_colour"]
HAS_SHAPE = "Is there a {}?"  # their wording (benchmarks/presence_probe.py asks the demo's elements so)
HAS_COLOUR = "Is there anything {}?"
# with --instruction-forms: the same presence asked inside an instruction, as instruction-tuned VLMs
# have seen questions: a context line (another scene's caption, so its words are no evidence about
# this image), the attribute named as the demo's elements name theirs, an answer instruction. Why
# (benchmarks/results/2026-12-01-cpu-demo-perceiving-backbones/): a backbone that answers "Is there
# anything red?" about the demo's images (AUC 0.77) did not carry it to the element query's form.
INSTRUCTION_TYPES = ["in_context"]
INSTRUCTION_FORMS = [
    "Caption: {context}\nAttribute: {attribute}\nIs this attribute in the image? Answer yes or no.",
    "Text: {context}\nItem: {attribute}\nDoes the image show this item? Answer yes or no.",
    "{context}\nCheck: {attribute}\nIs it visible in the image? Answer yes or no.",
]


@dataclass
class Group:
    """`count` shapes of one colour and one shape, in grid cells (column, row)."""

    colour: str
    shape: str  # a word of SHAPE_WORDS' values
    cells: list[tuple[int, int]]

    @property
    def count(self) -> int:
        return len(self.cells)

    def name(self) -> str:
        """'red square' / 'red squares': unique in a scene (colours and shapes are never shared)."""
        return f"{self.colour} {demo_data._plural(self.shape, self.count)}"

    def be(self) -> str:
        return "Is" if self.count == 1 else "Are"


def relation(a: Group, b: Group, rel: str) -> bool:
    """Whether every shape of `a` lies entirely `rel` every shape of `b` (grid columns / rows)."""
    ca, cb = [c[0] for c in a.cells], [c[0] for c in b.cells]
    ra, rb = [c[1] for c in a.cells], [c[1] for c in b.cells]
    return {"left of": max(ca) < min(cb), "right of": min(ca) > max(cb),
            "above": max(ra) < min(rb), "below": min(ra) > max(rb)}[rel]


def _scene(rng: np.random.Generator) -> list[Group]:
    """Groups with distinct colours and distinct shapes; half the scenes of two or more groups put
    the first two on either side of the image (left/right or top/bottom), so relations are common."""
    n_groups = int(rng.choice([1, 2, 2, 3, 3]))
    colours = rng.choice(list(demo_data.COLOURS), size=n_groups, replace=False)
    shapes = rng.choice(list(SHAPE_WORDS.values()), size=n_groups, replace=False)
    counts = rng.integers(1, 5, size=n_groups)
    cells = demo_data.GRID_CELLS
    free = [(i, j) for i in range(cells) for j in range(cells)]
    axis = int(rng.integers(2)) if n_groups >= 2 and rng.random() < 0.5 else None
    groups = []
    for gi in range(n_groups):
        options = free
        if axis is not None and gi < 2:
            options = [c for c in free if (c[axis] < cells // 2) == (gi == 0)]
        picks = sorted(int(k) for k in rng.choice(len(options), size=int(counts[gi]), replace=False))
        chosen = [options[k] for k in picks]
        free = [c for c in free if c not in chosen]
        groups.append(Group(str(colours[gi]), str(shapes[gi]), chosen))
    return groups


def _draw(groups: list[Group], rng: np.random.Generator, size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), demo_data._background(rng))
    draw = ImageDraw.Draw(img)
    cell = size // demo_data.GRID_CELLS
    full_shape = {v: k for k, v in SHAPE_WORDS.items()}
    for g in groups:
        for i, j in g.cells:
            jitter = rng.integers(0, min(cell // 6, MAX_JITTER) + 1, size=2)
            demo_data._draw_shape(draw, full_shape[g.shape], demo_data._cell_box(i, j, cell, jitter),
                                  demo_data.COLOURS[g.colour])
    return img


def _caption(groups: list[Group]) -> str:
    """Every group (count, colour, shape) and every relation that holds between two groups."""
    names = [f"{demo_data.COUNT_WORDS.get(g.count, NUMBER_WORDS[g.count])} {g.name()}" for g in groups]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    sentences = [listed[0].upper() + listed[1:] + "."]
    for ai, a in enumerate(groups):
        for b in groups[ai + 1:]:
            rels = [r for r in RELATION_WORDS if relation(a, b, r)]
            if rels:
                verb = "is" if a.count == 1 else "are"
                sentences.append(f"The {a.name()} {verb} {' and '.join(rels)} the {b.name()}.")
    return " ".join(sentences)


def _half(g: Group, axis: int) -> int | None:
    """0 / 1: all of the group in the first / second half along `axis`; None: in both."""
    halves = {c[axis] >= demo_data.GRID_CELLS // 2 for c in g.cells}
    return halves.pop() if len(halves) == 1 else None


def _questions(groups: list[Group], rng: np.random.Generator, single_attribute: bool = False,
               instruction_forms: bool = False) -> list[tuple[str, str, str]]:
    """(type, question, answer) for one scene: at most two per type, yes/no ones in yes+no pairs."""
    out: list[tuple[str, str, str]] = []

    def some(candidates, k=2):
        if not candidates:
            return []
        picks = rng.choice(len(candidates), size=min(k, len(candidates)), replace=False)
        return [candidates[int(p)] for p in sorted(picks)]

    out.append(("caption", str(rng.choice(CAPTION_QUERIES)), _caption(groups)))
    out += some([("colour", f"What colour {'is' if g.count == 1 else 'are'} the "
                            f"{demo_data._plural(g.shape, g.count)}?", g.colour) for g in groups])
    out += some([("shape", f"What shape {'is the' if g.count == 1 else 'are the'} {g.colour} "
                           f"{'object' if g.count == 1 else 'objects'}?", g.shape) for g in groups])
    drawn = {g.shape for g in groups}
    absent = [s for s in SHAPE_WORDS.values() if s not in drawn]
    counts = [("count", f"How many {demo_data._plural(g.shape, 2)} are there?", NUMBER_WORDS[g.count]) for g in groups]
    counts += [("count", f"How many {g.colour} objects are there?", NUMBER_WORDS[g.count]) for g in groups]
    if rng.random() < 0.25:
        s = str(rng.choice(absent))
        counts.append(("count", f"How many {demo_data._plural(s, 2)} are there?", "zero"))
    out += some(counts)
    positions = []
    for g in groups:
        for axis, (first, second), ask in ((0, ("left", "right"), "on the left or on the right"),
                                           (1, ("top", "bottom"), "at the top or at the bottom")):
            half = _half(g, axis)
            if half is not None:
                positions.append(("position", f"{g.be()} the {g.name()} {ask}?", (first, second)[half]))
    out += some(positions)
    # relations: a yes/no pair about one clearly arranged pair of groups, and "what shape is <rel> X?"
    clear = [(a, b, r) for a in groups for b in groups if a is not b for r in RELATION_WORDS if relation(a, b, r)]
    if clear:
        a, b, r = clear[int(rng.integers(len(clear)))]
        wrong = [x for x in RELATION_WORDS if not _partly(a, b, x)]  # false of every shape, not only of some
        false_r = str(rng.choice(wrong))
        pair = [("relation", f"{a.be()} the {a.name()} {r} the {b.name()}?", "yes"),
                ("relation", f"{a.be()} the {a.name()} {false_r} the {b.name()}?", "no")]
        out += [pair[int(k)] for k in rng.permutation(2)]
    unique = []
    for b in groups:
        for r in RELATION_WORDS:
            holds = [a for a in groups if a is not b and relation(a, b, r)]
            touches = [a for a in groups if a is not b and _partly(a, b, r)]
            if len(holds) == 1 and touches == holds:
                unique.append(("relation", f"What shape is {r} the {b.name()}?", holds[0].shape))
    out += some(unique, 1)
    # presence: one drawn (colour, shape) and one not drawn, often a colour and a shape that are
    # both in the image but not together
    pairs = {(g.colour, g.shape) for g in groups}
    g = groups[int(rng.integers(len(groups)))]
    # in the groups' order: iterating the set `drawn` would follow str hashing, which differs from
    # one Python process to the next (PYTHONHASHSEED), and so would the corpus
    mixed = [(c, x.shape) for c in (y.colour for y in groups) for x in groups if (c, x.shape) not in pairs]
    other = [(c, s) for c in demo_data.COLOURS for s in SHAPE_WORDS.values() if (c, s) not in pairs]
    pool = mixed if mixed and rng.random() < 0.5 else other
    c, s = pool[int(rng.integers(len(pool)))]
    pair = [("presence", f"Is there a {g.colour} {g.shape}?", "yes"), ("presence", f"Is there a {c} {s}?", "no")]
    out += [pair[int(k)] for k in rng.permutation(2)]
    if single_attribute:
        out += _single_attribute(groups, rng, absent)
    if instruction_forms:
        out += _in_context(groups, rng)
    return out


def _single_attribute(groups: list[Group], rng: np.random.Generator, absent: list[str]) -> list[tuple[str, str, str]]:
    out: list[tuple[str, str, str]] = []
    # one attribute alone (what the demo's elements ask: "circle (object)", "blue (color)"): a drawn
    # shape and an absent one, a drawn colour and an absent one; drawn after the questions above,
    # so the scenes and the other questions are those of a corpus without them
    shown = groups[int(rng.integers(len(groups)))]
    pair = [("has_shape", HAS_SHAPE.format(shown.shape), "yes"),
            ("has_shape", HAS_SHAPE.format(absent[int(rng.integers(len(absent)))]), "no")]
    out += [pair[int(k)] for k in rng.permutation(2)]
    shown = groups[int(rng.integers(len(groups)))]
    missing = [x for x in demo_data.COLOURS if x not in {g.colour for g in groups}]
    pair = [("has_colour", HAS_COLOUR.format(shown.colour), "yes"),
            ("has_colour", HAS_COLOUR.format(missing[int(rng.integers(len(missing)))]), "no")]
    out += [pair[int(k)] for k in rng.permutation(2)]
    return out


def _in_context(groups: list[Group], rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """A yes/no pair on one colour or one shape (a drawn one and an absent one) in one instruction
    form, after the caption of a scene drawn from the same stream but not rendered: the context
    says nothing about this image, as the demo's prompt says nothing about whether it was drawn."""
    context = _caption(_scene(rng))
    if rng.random() < 0.5:
        drawn = [g.colour for g in groups]
        absent = [c for c in demo_data.COLOURS if c not in drawn]
        kind = "color"
    else:
        drawn = [g.shape for g in groups]
        absent = [x for x in SHAPE_WORDS.values() if x not in drawn]
        kind = "object"
    form = INSTRUCTION_FORMS[int(rng.integers(len(INSTRUCTION_FORMS)))]
    shown, missing = drawn[int(rng.integers(len(drawn)))], absent[int(rng.integers(len(absent)))]
    pair = [("in_context", form.format(context=context, attribute=f"{shown} ({kind})"), "yes"),
            ("in_context", form.format(context=context, attribute=f"{missing} ({kind})"), "no")]
    return [pair[int(k)] for k in rng.permutation(2)]


def _partly(a: Group, b: Group, rel: str) -> bool:
    """Whether some shape of `a` lies `rel` some shape of `b` (so "what is <rel> b" could mean a)."""
    return any(relation(Group(a.colour, a.shape, [ca]), Group(b.colour, b.shape, [cb]), rel)
               for ca in a.cells for cb in b.cells)


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of scene `index` of corpus `seed` (independent of the number of scenes)."""
    return np.random.default_rng([NAMESPACE, seed, index])


def generate(out: Path, *, seed: int = 1, n_scenes: int = 2000, image_size: int = 128,
             single_attribute: bool = False, instruction_forms: bool = False) -> dict:
    """Write the corpus to `out` (atomically, as a whole folder); return its summary."""
    if n_scenes < 1:
        raise ValueError(f"--scenes must be at least 1 (got {n_scenes})")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"--image-size must be at least {MIN_IMAGE_SIZE} px (got {image_size})")
    width = max(6, len(str(n_scenes - 1)))
    rows = []
    with atomic_path(out, directory=True) as tmp:
        (tmp / "images").mkdir()
        for k in range(n_scenes):
            rng = scene_rng(seed, k)
            groups = _scene(rng)
            img = _draw(groups, rng, image_size)
            name = f"images/{k:0{width}d}.png"
            (tmp / name).write_bytes(demo_data._png_bytes(img))
            for qi, (qtype, question, answer) in enumerate(_questions(groups, rng, single_attribute, instruction_forms)):
                rows.append({"id": f"{k:0{width}d}-{qi:02d}", "scene": k, "image": name, "type": qtype,
                             "query": f"<image>{question}", "answer": answer})
        table = pd.DataFrame(rows, columns=["id", "scene", "image", "type", "query", "answer"])
        types = (QUESTION_TYPES + (SINGLE_ATTRIBUTE_TYPES if single_attribute else [])
                 + (INSTRUCTION_TYPES if instruction_forms else []))
        write_parquet(table, tmp / "corpus.parquet")
        with open(tmp / "corpus.jsonl", "w", encoding="utf-8") as fh:
            for row in swift_rows(table):
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        summary = {
            "format": FORMAT,
            "seed": seed,
            "namespace": NAMESPACE,
            "rng": "numpy.random.default_rng([namespace, seed, scene])",
            "scenes": n_scenes,
            "image_size": image_size,
            "rows": len(table),
            "per_type": {t: int((table["type"] == t).sum()) for t in types},
            "answers": {t: {a: int(n) for a, n in sorted(table.loc[table["type"] == t, "answer"].value_counts().items())}
                        for t in types if t != "caption"},
            "sha256": {f: hashlib.sha256((tmp / f).read_bytes()).hexdigest() for f in ("corpus.jsonl", "corpus.parquet")},
        }
        write_json(summary, tmp / "summary.json")
    return summary


def swift_rows(table: pd.DataFrame) -> list[dict]:
    """ms-swift rows, as `instructions.to_swift_rows` writes them, with paths relative to the corpus."""
    return [{"messages": [{"role": "user", "content": r.query}, {"role": "assistant", "content": r.answer}],
             "images": [r.image]} for r in table.itertuples(index=False)]


def _at_least(minimum: int, flag: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer (got {text!r})") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{flag} must be at least {minimum} (got {value})")
        return value
    return parse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain-corpus",
        help="write a synthetic captions + visual questions corpus to pretrain the tiny backbones (deterministic)",
        description=__doc__,
    )
    p.add_argument("--out", type=Path, required=True, help="folder to create (replaced atomically if it exists)")
    p.add_argument("--seed", type=int, default=1,
                   help="corpus seed; any value is disjoint from the demo data (another random namespace)")
    p.add_argument("--scenes", type=_at_least(1, "--scenes"), default=2000, help="number of images (scenes)")
    p.add_argument("--image-size", type=_at_least(MIN_IMAGE_SIZE, "--image-size"), default=128,
                   help=f"square image side in pixels (at least {MIN_IMAGE_SIZE})")
    p.add_argument("--single-attribute", action="store_true",
                   help="also ask for one attribute alone, a yes/no pair each per scene: 'Is there a circle?' "
                        "(has_shape), 'Is there anything blue?' (has_colour); the other rows stay the same bytes")
    p.add_argument("--instruction-forms", action="store_true",
                   help="also ask for one colour or shape inside an instruction (another scene's caption, "
                        "'Attribute: blue (color)', 'Answer yes or no.'), a yes/no pair per scene (in_context), "
                        "drawn after all other rows, which stay the same bytes")
    p.set_defaults(func=_run)


def _run(args) -> int:
    summary = generate(args.out, seed=args.seed, n_scenes=args.scenes, image_size=args.image_size,
                       single_attribute=args.single_attribute, instruction_forms=args.instruction_forms)
    print(json.dumps({k: summary[k] for k in ("scenes", "rows", "per_type")}))
    return 0
