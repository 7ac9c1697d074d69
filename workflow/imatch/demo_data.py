"""Stage `demo-data`: a small EvalMuse-shaped data set whose labels follow from the pixels.

Real EvalMuse-40K cannot be downloaded here, so the embedded default runs on this. Each prompt
names one or two groups of coloured shapes (optionally in a spatial relation); several simulated
"T2I models" draw it, each with its own error rate (wrong colour, wrong shape, wrong count,
missing group, swapped relation). Element labels come from what was actually drawn, seen through
simulated annotators who sometimes disagree; the total score follows from the fraction of the
prompt that is satisfied. So a model that looks at the image can learn the labels, and one that
reads only the text cannot.

The output has the HF repo's layout (train_list.json, test.json, images.zip.part-*) plus
eval.json (labels of test.json in the official means format) and final_test.json (an unlabelled
final-test list), and reproduces the real files' quirks: the misspelled `promt_meaningless` key,
phrases containing parentheses, category variants (`Counting`, `object-other`), a varying number
of annotators, and `fidelity_label` present only sometimes.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from imatch.atomic import atomic_path

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
}
# The last shape's phrase has parentheses of its own, as some real EvalMuse phrases do.
SHAPES = ["circle", "square", "triangle", "star", "ring (donut)"]
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
RELATIONS = {"left of": "to the left of", "above": "above"}
# Simulated T2I models: folder name -> probability that each attribute is rendered wrongly.
T2I_MODELS = {"sketchy-v1": 0.5, "painter-xl": 0.3, "crisp-2": 0.15, "oracle-3": 0.05}
# Abstract prompts (prompt_meaningless = 1): (text, its one element key).
MEANINGLESS_PROMPTS = [
    ("the quiet weight of a forgotten monday", "monday (other)"),
    ("what the colour seven tastes like", "colour seven (attribute)"),
    ("an apology written by the wind", "apology (other)"),
]
STYLES = ["flat vector art", "trending on artstation", "minimalist poster", "4k"]
ZIP_TIME = (1980, 1, 1, 0, 0, 0)


@dataclass
class Group:
    count: int
    colour: str
    shape: str


@dataclass
class PromptSpec:
    prompt_id: str
    prompt_type: str  # "real" or "synthetic"
    text: str
    groups: list[Group]
    relation: str | None  # key of RELATIONS, between groups[0] and groups[1]
    meaningless: bool
    elements: list[tuple[str, str, str]]  # (key, kind, group index or "rel")


def _plural(shape: str, n: int) -> str:
    if n == 1:
        return shape
    if shape.endswith(")"):
        head, _, tail = shape.partition(" (")
        return f"{head}s ({tail}"
    return shape + "s"


def _make_prompt(rng: np.random.Generator, prompt_id: str) -> PromptSpec:
    prompt_type = "real" if rng.random() < 0.5 else "synthetic"
    if rng.random() < 0.06:
        text, key = MEANINGLESS_PROMPTS[int(rng.integers(len(MEANINGLESS_PROMPTS)))]
        return PromptSpec(prompt_id, prompt_type, text, [], None, True, [(key, "other", "")])
    n_groups = 1 if rng.random() < 0.4 else 2
    colours = rng.choice(list(COLOURS), size=n_groups, replace=False)
    shapes = rng.choice(SHAPES, size=n_groups, replace=False)
    groups = [Group(int(rng.integers(1, 4)), str(c), str(s)) for c, s in zip(colours, shapes)]
    relation = str(rng.choice(list(RELATIONS))) if n_groups == 2 and rng.random() < 0.5 else None

    elements: list[tuple[str, str, str]] = []
    phrases = []
    shared_count = n_groups == 2 and groups[0].count == groups[1].count
    for gi, g in enumerate(groups):
        shape_cat = "object-other" if g.shape.startswith("ring") else "object"
        if prompt_type == "real":
            count_phrase, count_cat = str(g.count), "Counting"
            phrase = f"{g.count if g.count > 1 else ''} {g.colour} {_plural(g.shape, g.count)}".strip()
        else:
            count_phrase, count_cat = COUNT_WORDS[g.count], "counting"
            phrase = f"{COUNT_WORDS[g.count]} {g.colour} {_plural(g.shape, g.count)}"
        if shared_count:  # element keys are unique per record: name the counted noun too
            count_phrase = f"{count_phrase} {_plural(g.shape, g.count)}"
        count_key = f"{count_phrase} ({count_cat})"
        phrases.append(phrase)
        elements.append((f"{g.shape} ({shape_cat})", "shape", str(gi)))
        elements.append((f"{g.colour} (color)", "colour", str(gi)))
        if g.count > 1:
            elements.append((count_key, "count", str(gi)))
    if relation is not None:
        elements.append((f"{relation} (spatial)", "relation", "rel"))
        body = f"{phrases[0]} {RELATIONS[relation]} {phrases[1]}"
    else:
        body = " and ".join(phrases)
    if prompt_type == "real":
        text = f"{body}, {rng.choice(STYLES)}"
    else:
        text = f"A picture showing {body}."
    return PromptSpec(prompt_id, prompt_type, text, groups, relation, False, elements)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, colour) -> None:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=colour)
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            ang = np.pi / 2 + k * np.pi / 5
            pts.append((cx + rad * np.cos(ang), cy - rad * np.sin(ang)))
        draw.polygon(pts, fill=colour)
    else:  # ring
        draw.ellipse(box, outline=colour, width=max(2, int(r / 2.5)))


GRID_CELLS = 4  # images are a GRID_CELLS x GRID_CELLS grid; each shape fills one cell


def _background(rng: np.random.Generator) -> tuple[int, int, int]:
    """A light background colour (every channel >= 225, so no shape colour can equal it)."""
    return tuple(int(v) for v in rng.integers(225, 256, size=3))


def _cell_box(i: int, j: int, cell: int, jitter) -> tuple[int, int, int, int]:
    """The box of the shape drawn in grid cell (column i, row j): a 3-px margin, shifted by `jitter`
    (dx, dy); `pretrain_corpus` draws its scenes through this and `_draw_shape` too."""
    x0, y0 = i * cell + 3 + int(jitter[0]), j * cell + 3 + int(jitter[1])
    side = cell - 8
    return (x0, y0, x0 + side, y0 + side)


def _render(spec: PromptSpec, error_rate: float, rng: np.random.Generator, size: int):
    """Draw one image for `spec` with a model's error rate; return (image, element truths)."""
    img = Image.new("RGB", (size, size), _background(rng))
    draw = ImageDraw.Draw(img)
    cells = GRID_CELLS
    cell = size // cells
    free = {(i, j) for i in range(cells) for j in range(cells)}

    def region(group_index: int, swapped: bool):
        if spec.relation is None:
            return sorted(free)
        first = (group_index == 0) != swapped
        if spec.relation == "left of":
            return sorted(c for c in free if (c[0] < cells // 2) == first)
        return sorted(c for c in free if (c[1] < cells // 2) == first)

    swapped = spec.relation is not None and rng.random() < error_rate
    truth: dict[str, int] = {}
    present = []
    for gi, g in enumerate(spec.groups):
        missing = rng.random() < error_rate / 2
        shape = g.shape if rng.random() >= error_rate else str(rng.choice([s for s in SHAPES if s != g.shape]))
        colour = g.colour if rng.random() >= error_rate else str(rng.choice([c for c in COLOURS if c != g.colour]))
        count = g.count
        if rng.random() < error_rate:
            count = max(1, g.count + int(rng.choice([-1, 1])))
        drawn = 0 if missing else count
        options = region(gi, swapped)
        picks = rng.choice(len(options), size=min(drawn, len(options)), replace=False) if drawn else []
        for k in picks:
            i, j = options[int(k)]
            free.discard((i, j))
            jitter = rng.integers(0, cell // 6 + 1, size=2)
            _draw_shape(draw, shape, _cell_box(i, j, cell, jitter), COLOURS[colour])
        present.append(drawn > 0)
        truth[f"shape{gi}"] = int(drawn > 0 and shape == g.shape)
        truth[f"colour{gi}"] = int(drawn > 0 and colour == g.colour)
        truth[f"count{gi}"] = int(drawn == g.count)
    if spec.relation is not None:
        truth["rel"] = int(all(present) and not swapped)
    if spec.meaningless:  # abstract prompt: random scribbles, annotators guess
        for _ in range(int(rng.integers(1, 4))):
            x0, y0 = (int(v) for v in rng.integers(0, size - cell, size=2))
            _draw_shape(draw, str(rng.choice(SHAPES)), (x0, y0, x0 + cell, y0 + cell), COLOURS[str(rng.choice(list(COLOURS)))])
    return img, truth


def _annotate(spec: PromptSpec, truth: dict[str, int], rng: np.random.Generator, labelled: bool) -> dict:
    n_ann = int(rng.choice([2, 3, 3, 3, 4]))
    element_score = {}
    satisfied = []
    for key, kind, gi in spec.elements:
        if spec.meaningless:
            hit = int(rng.random() < 0.5)
        else:
            hit = truth["rel" if kind == "relation" else f"{kind}{gi}"]
        satisfied.append(hit)
        flips = rng.random(n_ann) < 0.1
        element_score[key] = [int(hit ^ f) for f in flips] if labelled else None
    fraction = float(np.mean(satisfied)) if satisfied else 0.0
    centre = 1.0 + 4.0 * fraction
    totals = np.clip(np.rint(centre + rng.normal(0.0, 0.6, size=n_ann)), 1, 5).astype(int)
    record = {
        "prompt_id": spec.prompt_id,
        "prompt": spec.text,
        "type": spec.prompt_type,
        "img_path": None,
        "total_score": [int(t) for t in totals] if labelled else None,
        "element_score": element_score,
        "promt_meaningless": [int(spec.meaningless or rng.random() < 0.03) for _ in range(n_ann)],
        "split_confidence": [int(rng.random() < 0.08) for _ in range(n_ann)],
        "attribute_confidence": [int(rng.random() >= 0.1) for _ in range(n_ann)],
    }
    if rng.random() < 0.7:
        record["fidelity_label"] = ["ok" if t >= 3 else "mismatch" for t in totals]
    return record


def _means(record: dict) -> dict:
    """A labelled record in the official eval.json format (annotator means)."""
    return {
        "prompt": record["prompt"],
        "img_path": record["img_path"],
        "total_score": float(np.mean(record["total_score"])),
        "element_score": {k: float(np.mean(v)) for k, v in record["element_score"].items()},
    }


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _write_zip_parts(images: dict[str, bytes], out: Path, n_parts: int) -> None:
    """One zip of `images/<model>/<id>.png`, split in parts like the real `images.zip.part-a?`."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(images):
            info = zipfile.ZipInfo(f"images/{name}", date_time=ZIP_TIME)
            info.external_attr = 0o644 << 16
            zf.writestr(info, images[name])
    data = buf.getvalue()
    step = -(-len(data) // n_parts)
    for k in range(n_parts):
        (out / f"images.zip.part-a{chr(ord('a') + k)}").write_bytes(data[k * step:(k + 1) * step])


def generate(
    out: Path,
    *,
    seed: int = 0,
    n_train_prompts: int = 120,
    n_val_prompts: int = 30,
    n_test_prompts: int = 20,
    image_size: int = 128,
    layout: str = "zip-parts",
    n_parts: int = 3,
) -> dict:
    """Write the demo data set to `out` (atomically as a whole folder); return its counts."""
    rng = np.random.default_rng(seed)
    n_total = n_train_prompts + n_val_prompts + n_test_prompts
    specs = [_make_prompt(rng, f"{i:05d}") for i in range(1, n_total + 1)]
    splits = {
        "train": specs[:n_train_prompts],
        "val": specs[n_train_prompts:n_train_prompts + n_val_prompts],
        "test": specs[n_train_prompts + n_val_prompts:],
    }
    images: dict[str, bytes] = {}
    records: dict[str, list[dict]] = {k: [] for k in splits}
    for split, split_specs in splits.items():
        for spec in split_specs:
            for model, error_rate in T2I_MODELS.items():
                img, truth = _render(spec, error_rate, rng, image_size)
                name = f"{model}/{spec.prompt_id}.png"
                images[name] = _png_bytes(img)
                rec = _annotate(spec, truth, rng, labelled=True)
                rec["img_path"] = name
                records[split].append(rec)

    def unlabelled(rec: dict) -> dict:
        return {**rec, "total_score": None, "element_score": {k: None for k in rec["element_score"]}}

    with atomic_path(out, directory=True) as tmp:
        _dump(tmp / "train_list.json", records["train"])
        _dump(tmp / "test.json", [unlabelled(r) for r in records["val"]])
        _dump(tmp / "eval.json", [_means(r) for r in records["val"]])
        _dump(tmp / "final_test.json", [unlabelled(r) for r in records["test"]])
        if layout == "zip-parts":
            _write_zip_parts(images, tmp, n_parts)
        elif layout == "folder":
            for name, data in images.items():
                path = tmp / "images" / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
        else:
            raise ValueError(f"unknown layout {layout!r} (zip-parts or folder)")
    return {
        "images": len(images),
        "bytes": sum(len(b) for b in images.values()),
        **{f"{k}_records": len(v) for k, v in records.items()},
    }


def _dump(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo-data",
        help="generate the embedded EvalMuse-shaped demo data set (deterministic)",
        description=__doc__,
    )
    p.add_argument("--out", type=Path, required=True, help="folder to create (HF layout)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-prompts", type=int, default=120, help="prompts in train_list.json")
    p.add_argument("--val-prompts", type=int, default=30, help="prompts in test.json / eval.json")
    p.add_argument("--test-prompts", type=int, default=20, help="prompts in final_test.json")
    p.add_argument("--image-size", type=int, default=128, help="square image side in pixels")
    p.add_argument("--layout", choices=["zip-parts", "folder"], default="zip-parts",
                   help="images as a split zip (like the HF repo) or an images/ folder")
    p.add_argument("--parts", type=int, default=3, help="number of zip parts")
    p.set_defaults(func=_run)


def _run(args) -> int:
    counts = generate(
        args.out, seed=args.seed, n_train_prompts=args.train_prompts, n_val_prompts=args.val_prompts,
        n_test_prompts=args.test_prompts, image_size=args.image_size, layout=args.layout, n_parts=args.parts,
    )
    print(json.dumps(counts))
    return 0
