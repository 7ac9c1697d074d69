"""Stage `pretrain-tiny`: teach a tiny random backbone to see before it is fine-tuned for alignment.

Why (issue 19): a tiny backbone with random weights learns nothing from the demo's 15-level scores
(holdout SRCC ~0.1, the label prior). Real VLMs learn perception from captions and visual
questions first; this stage does the same in the demo's visual world, on the corpus that
`imatch pretrain-corpus` writes (coloured shapes; a caption and questions about colour, shape,
count, position, relation, presence). The objective is dense: every answer token (`--types`:
the six question types by default; the captions can be added, but with them the tiny InternVL
learnt no colour in 2000 steps, see Measured below).

How: `imatch tiny-backbone`'s random model of the architecture (`--size`), then ms-swift's own
`swift sft`, full fine-tuning (vision tower, aligner and LLM), the architecture's model type,
template, plug-in and image budget, as `imatch train` runs it (the same `MAX_PIXELS` / tile
environment as the demo's fine-tunes, `--max-pixels 16384` = 128 x 128 by default). The corpus
rows name their images relative to the corpus folder; ms-swift resolves them against its working
directory, so the rows are rewritten with absolute paths into the scratch folder. The final
weights become a backbone folder in the layout `imatch tiny-backbone` writes (the tokenizer and
processor of the random build, `imatch-backbone.json` saying what it was pretrained on, sealed),
which `imatch train` and `imatch score` load as they load any backbone. Deterministic: the build
is seeded, swift's `--seed` / `--data_seed` fix initialisation order and data order, one
data-loading process; on the same CPU build and thread count the same command writes the same
bytes (tests/test_pretrain_tiny.py runs it twice).

Qwen2.5-VL's filler rows (the size of the shipped file). ms-swift's `qwen2_5_vl` template
hard-codes Qwen's real special-token ids (`Qwen2VLTemplate.image_token_id = 151655`, a class
attribute used to find and expand the image placeholder), so the tiny tokenizer puts Qwen's added
tokens at their real ids and fills ids [BPE size, 151643) with entries no merge produces
(archs/qwen2_5_vl.py): a tied 151,665 x 128 embedding, ~78 MB of float32, almost all of it rows
that no input can reach. Remapping the ids would need a template of our own for the tiny model
only (the real checkpoint has the real ids), so the demo would no longer run the stock template
the paper's runs use; rejected. Instead the filler rows are set to exactly zero before
pretraining and kept there: a gradient hook (`FillerRows`, loaded into the swift process as a
plug-in) zeroes their gradient, so AdamW's moments for those rows stay zero and its update is
0 / (sqrt(0) + eps) = 0, and decoupled weight decay multiplies a zero row by (1 - lr * wd), which
keeps it zero; the hook checks at the end of training that they are still zero (and the stage
checks the saved weights again). As output logits (the embedding is tied) a zero row gives logit
0 to every filler id, always: the softmax carries their constant mass, which the answer's logit
has to outgrow (it cannot be pushed down). Zero rows deflate to almost nothing, so the file to
ship (`--pack FILE`, a deterministic deflated zip of the backbone folder: sorted names, fixed
times; `imatch pretrained-backbone` restores it) costs the reachable rows only (tiny Qwen2.5-VL: 3.1 MB
packed, 82 MB unpacked), and the unpacked folder is byte for byte the trained one (its seal is
checked): no loader-side reconstruction that could drift from what was trained, and ms-swift
loads it as any backbone.

Held-out check (`imatch pretrain-tiny-eval`, or `--eval-corpus` at the end of training): greedy
decoding through ms-swift's TransformersEngine of another corpus seed's questions, exact-match
accuracy per question type beside two blind baselines: the type's majority answer, and the
most frequent training answer of the same question text (what a model that ignores the image can
reach at best from the training corpus).

What ships (`make pretrained`, `pretrained/README.md`): the three backbones of this recipe, with
their held-out accuracy. Trials that chose it (before the record lost its paths and wall time, so
their bytes differ from the shipped files; figures close to the shipped ones):

Measured (2-core CPU, `--threads 2`, batch 16, training corpus seed 1 with 2000 scenes = 21,582
question rows, held out: all 2174 questions of seed 2; accuracy / majority / same-question blind):
- tiny InternVL, questions only, lr 5e-4, 4000 steps (17.5 min wall, other jobs sharing the
  cores part of the time; 0.23 s/step alone): colour 0.415 / 0.244 / 0.202, shape 0.395 / 0.207 /
  0.174, count 0.292 / 0.260 / 0.242, position 0.498 / 0.292 / 0.563, relation 0.460 / 0.373 /
  0.188, presence 0.500 / 0.500 / 0.487 (always "no"). Colour and shape clearly above the blind
  answers; count barely; position, presence not (no better than the question text alone).
  The random build answers nothing (0.000: byte noise).
- tiny Ovis2, the same recipe (12.1 min wall, 11.8 of them training): colour 0.448 / 0.244, shape
  0.289 / 0.207, count 0.275 / 0.260, position 0.465 / 0.292 (blind 0.563), relation 0.454 /
  0.373, presence 0.573 / 0.500 (answers both). Tiny Qwen2.5-VL: not yet run long (100 steps only,
  for its speed and size).
- InternVL, lr 3e-4, 2000 steps: colour 0.440, shape 0.224, count 0.260, presence 0.500.
- with the captions (lr 3e-4, 2000 steps; lr 1e-3, 1500 steps): colour 0.22 / 0.21 on a 600-question
  sample (majority 0.26), every type at its prior: the loss plateaued on the captions' grammar.
- colour rows only, lr 3e-3, 400 steps: always "purple" (0.21); lr 1e-3 in a plain loop: 0.20 after
  300 steps; lr 3e-4 in a plain loop: 0.50 after 400 steps (majority 0.26): high rates collapse to
  the prior.
- seconds per step (batch 16, questions only, alone on the cores): InternVL 0.23, Ovis2 0.16,
  Qwen2.5-VL 0.69 (its 151,665-row tied head; 4000 steps ~ 46 min).
- shipped sizes (`--pack`): InternVL 2.3 MB, Ovis2 2.5 MB, Qwen2.5-VL 3.1 MB (82 MB unpacked).

On a GPU (`--device cuda`, H200, `benchmarks/results/2026-12-01-h200-pretrain-sweep/`; a corpus of
4000 scenes with the single-attribute questions, the eight types): no run answered "Is there a
circle?" / "Is there anything blue?" other than with one constant after 3000 steps, whatever the
size or rate; after 8000 steps two of three tiny InternVL runs did (lr 1e-3: has_shape 0.788,
presence 0.694; lr 5e-4: has_colour 0.758, colour 0.543; majority 0.556 / 0.503 / 0.553 / 0.272),
the same recipes at 9000 steps did not. The has_* questions alone learnt nothing; lr 2e-3 and a
wider InternVL stayed at the plateau. ~0.04 s a step there, 6-8 runs side by side.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from imatch import archs, backbone, integrity, swift_log, train
from imatch.atomic import atomic_path, write_json
from imatch.download import MANIFEST
from imatch.errors import InputError

NAME = "imatch_filler_rows"
FILLER_ENV = "IMATCH_FILLER_ROWS"  # "start:stop": rows of the input embedding kept at zero
FILLER_RECORD_ENV = "IMATCH_FILLER_RECORD"  # where the callback writes what it checked
FILLER_PREFIX = "<|filler_"
RECORD = "pretraining.json"
DEFAULT_TYPES = ["colour", "shape", "count", "position", "relation", "presence"]
# has_shape, has_colour: a corpus made with --single-attribute; in_context: with --instruction-forms
QUESTION_TYPES = [*DEFAULT_TYPES, "has_shape", "has_colour", "in_context"]


# ---------------------------------------------------------------- filler rows (Qwen2.5-VL)

def filler_rows(backbone: Path) -> tuple[int, int] | None:
    """The id range [start, stop) of the tokenizer's unreachable filler entries, or None."""
    data = json.loads((Path(backbone) / "tokenizer.json").read_text(encoding="utf-8"))
    ids = sorted(i for t, i in data["model"]["vocab"].items() if t.startswith(FILLER_PREFIX))
    if not ids:
        return None
    if ids != list(range(ids[0], ids[-1] + 1)):
        raise ValueError(f"{backbone}: filler ids are not one contiguous range")
    return ids[0], ids[-1] + 1


def input_embedding(model):
    return model.get_input_embeddings().weight


def zero_fillers(model, rows: tuple[int, int]) -> None:
    import torch

    with torch.no_grad():
        for weight in embedding_weights(model):
            weight[rows[0]:rows[1]].zero_()


def embedding_weights(model) -> list:
    """The input embedding, and the output embedding where it is not tied to it."""
    weights = [input_embedding(model)]
    out = model.get_output_embeddings()
    if out is not None and out.weight is not weights[0]:
        weights.append(out.weight)
    return weights


def fillers_are_zero(model, rows: tuple[int, int]) -> bool:
    return all(not w[rows[0]:rows[1]].detach().any() for w in embedding_weights(model))


def keep_fillers_at_zero(model, rows: tuple[int, int]) -> list:
    """Zero the filler rows' gradient of the input (and an untied output) embedding."""
    handles = []
    for weight in embedding_weights(model):
        def hook(grad, start=rows[0], stop=rows[1]):
            grad = grad.clone()
            grad[start:stop] = 0
            return grad
        handles.append(weight.register_hook(hook))
    return handles


def _callback(args, trainer):
    from transformers import TrainerCallback

    start, stop = (int(x) for x in os.environ[FILLER_ENV].split(":"))
    record = os.environ.get(FILLER_RECORD_ENV)

    class FillerRows(TrainerCallback):
        """Keeps rows [start, stop) of the embedding at zero; writes what it saw to the record."""

        def __init__(self):
            self.hooked_steps = 0
            self.seen = False

        def _count(self, grad):
            self.seen = True
            return grad

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if stop <= start:
                return
            if not fillers_are_zero(model, (start, stop)):
                raise RuntimeError(f"filler rows {start}:{stop} are not zero at the start of training")
            keep_fillers_at_zero(model, (start, stop))
            input_embedding(model).register_hook(self._count)

        def on_step_end(self, args, state, control, **kwargs):
            self.hooked_steps += self.seen
            self.seen = False

        def on_train_end(self, args, state, control, model=None, **kwargs):
            if stop <= start:
                return
            zero = fillers_are_zero(model, (start, stop))
            if record:
                Path(record).write_text(json.dumps({"rows": [start, stop], "steps_hooked": self.hooked_steps,
                                                    "zero_at_end": zero}))
            if not zero:
                raise RuntimeError(f"filler rows {start}:{stop} moved during training")

    return FillerRows()


# ---------------------------------------------------------------- data

def absolute_rows(corpus: Path, out: Path, types: list[str] | None = None) -> int:
    """The corpus' ms-swift rows (one question each) with absolute image paths: ms-swift resolves
    relative ones against its working directory. (One multi-turn row per scene would encode each
    image once, but its answers leak into one another's context: "what colour is the triangle?"
    answers "what shape is the green object?". Rejected.)"""
    corpus = Path(corpus).resolve()
    table = _check_types(corpus, types)
    rows = 0
    with open(corpus / "corpus.jsonl", encoding="utf-8") as src, open(out, "w", encoding="utf-8") as dst:
        for line, qtype in zip(src, table["type"]):
            if types is not None and qtype not in types:
                continue
            row = json.loads(line)
            row["images"] = [str(corpus / p) for p in row["images"]]
            dst.write(json.dumps(row, ensure_ascii=False) + "\n")
            rows += 1
    return rows


def _check_types(corpus: Path, types: list[str] | None):
    table = _table(corpus)
    unknown = sorted(set(types or []) - set(table["type"]))
    if unknown:
        raise InputError(corpus, f"no question type {unknown} in the corpus")
    return table


def _table(corpus: Path):
    import pandas as pd

    path = Path(corpus) / "corpus.parquet"
    if not path.is_file():
        raise InputError(corpus, "not a pretraining corpus (no corpus.parquet; made by `imatch pretrain-corpus`)")
    return pd.read_parquet(path)


# ---------------------------------------------------------------- training

def swift_command(args, arch: archs.Arch, model: Path, dataset: Path, output_dir: Path) -> list[str]:
    plugins = [swift_log.__file__, *([arch.plugin] if arch.plugin else []), __file__]
    return [
        *train.swift_sft(arch, model, [dataset], output_dir, workers=args.workers),
        "--tuner_type", "full", "--freeze_vit", "false", "--freeze_aligner", "false",
        "--learning_rate", str(args.learning_rate), "--weight_decay", str(args.weight_decay),
        "--warmup_ratio", str(args.warmup_ratio), "--lr_scheduler_type", args.lr_scheduler,
        "--max_steps", str(args.steps), "--num_train_epochs", "1000",
        "--per_device_train_batch_size", str(args.batch_size), "--gradient_accumulation_steps", "1",
        "--max_length", str(args.max_length), "--max_pixels", str(args.max_pixels),
        "--seed", str(args.seed), "--data_seed", str(args.seed),
        "--save_steps", str(args.steps), "--save_only_model", "true", "--save_total_limit", "1",
        "--logging_steps", str(args.logging_steps),
        "--torch_dtype", "float32", "--bf16", "false", "--fp16", "false", "--gradient_checkpointing", "false",
        "--external_plugins", *plugins, "--callbacks", NAME,
    ]


def pretrain(args) -> dict:
    arch = archs.get(args.arch)
    corpus = Path(args.corpus)
    _check_types(corpus, args.types)
    summary = json.loads((corpus / "summary.json").read_text()) if (corpus / "summary.json").is_file() else {}
    scratch = Path(args.scratch).resolve()
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    base = scratch / "backbone"
    spec_size = args.size
    if spec_size not in arch.sizes:
        raise InputError(args.arch, f"has sizes {arch.sizes}, not {spec_size!r}")
    arch.build(base, size=spec_size, seed=args.seed)
    rows = filler_rows(base)
    if rows is not None:
        _zero_saved_fillers(base, arch, rows)
    dataset = scratch / "corpus.jsonl"
    n_rows = absolute_rows(corpus, dataset, args.types)
    env = {**os.environ, **arch.swift_environment(args.max_pixels, args.max_tiles)}
    env.pop("NPROC_PER_NODE", None)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the byte-determinism is a CPU property
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    env[FILLER_ENV] = f"{rows[0]}:{rows[1]}" if rows else "0:0"
    check = scratch / "filler-check.json"
    env[FILLER_RECORD_ENV] = str(check.resolve())
    train_dir = scratch / "train"
    cmd = swift_command(args, arch, base, dataset, train_dir)
    print("$ " + " ".join(cmd), flush=True)
    start = time.time()
    proc = subprocess.run(cmd, env=env)
    wall = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"swift sft failed with exit code {proc.returncode}; see {scratch}")
    final = train_dir / f"checkpoint-{args.steps}"
    if not final.is_dir():
        raise SystemExit(f"swift sft finished without {final}")
    if rows is not None and not check.is_file():
        raise SystemExit(f"the filler-row plug-in did not report ({check} missing): were the rows kept at zero?")
    log = train_dir / "logging.jsonl"
    curve = train.loss_curve(log) if log.is_file() else []  # the loss per step, as `imatch train` records it
    record = {
        "arch": arch.name, "size": spec_size, "seed": args.seed, "random_weights": False,
        "pretrained_on": {"corpus_seed": summary.get("seed"), "corpus_scenes": summary.get("scenes"),
                          "corpus_sha256": summary.get("sha256"), "rows": n_rows, "types": args.types},
        "recipe": {k: getattr(args, k) for k in ("steps", "learning_rate", "weight_decay", "warmup_ratio",
                                                 "lr_scheduler", "batch_size", "max_length", "max_pixels",
                                                 "max_tiles", "threads")}
                  # a GPU run says so; a CPU run's record keeps the shipped files' keys (the number
                  # of data-loading processes is in the swift command below)
                  | ({"device": args.device} if args.device != "cpu" else {}),
        "filler_rows": list(rows) if rows else None,
        "filler_check": json.loads(check.read_text()) if check.is_file() else None,
        "loss_curve": curve,
        # the swift flags, with this run's folders named by their role: the record (and so the
        # packed file) is the same bytes wherever and whenever the command runs
        "swift_command": [_role(a, {str(scratch): "<scratch>", str(Path(__file__).parent): "<imatch>"}) for a in cmd[1:]],
    }
    with atomic_path(args.out, directory=True) as tmp:
        _export(final, base, tmp, arch, rows)
        (tmp / "imatch-backbone.json").write_text(json.dumps({
            "arch": arch.name, "size": spec_size, "seed": args.seed, "random_weights": False,
            "pretrained": RECORD}))
        write_json(record, tmp / RECORD)
        integrity.seal(tmp)
    if args.pack:
        backbone.pack(args.out, args.pack)
    if not args.keep_scratch:
        shutil.rmtree(scratch, ignore_errors=True)
    return {**record, "wall_seconds": round(wall, 1)}


def _role(arg: str, roles: dict[str, str]) -> str:
    for path, name in roles.items():
        arg = arg.replace(path, name)
    return arg


def _zero_saved_fillers(folder: Path, arch: archs.Arch, rows: tuple[int, int]) -> None:
    """Rewrite a built backbone's weights with its filler rows at zero."""
    model = _load_plain(folder)
    zero_fillers(model, rows)
    model.save_pretrained(folder)


def _load_plain(folder: Path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(folder, dtype="float32", device_map="cpu")


def _export(checkpoint: Path, base: Path, out: Path, arch: archs.Arch, rows) -> None:
    """The trained weights (as transformers saves them from the loaded model) with the random
    build's tokenizer, processor and generation config."""
    model = _load_plain(checkpoint)
    if rows is not None and not fillers_are_zero(model, rows):
        raise RuntimeError(f"filler rows {rows} of {checkpoint} are not zero")
    model.save_pretrained(out)
    for item in base.iterdir():
        if item.name.endswith(".safetensors") or item.name in {"config.json", "model.safetensors.index.json",
                                                                 MANIFEST, "imatch-backbone.json"}:
            continue
        if not (out / item.name).exists():
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, out / item.name)


# ---------------------------------------------------------------- held-out check

def blind_baselines(train_corpus: Path | None, table) -> dict:
    """Per type: the majority answer's rate on `table`, and (with a training corpus) the accuracy
    of answering each question with the training corpus' most frequent answer to that text."""
    out = {}
    by_question = {}
    if train_corpus is not None:
        train_table = _table(train_corpus)
        by_question = train_table.groupby("query")["answer"].agg(lambda s: s.value_counts().sort_index().idxmax()).to_dict()
    for t in QUESTION_TYPES:
        part = table[table["type"] == t]
        if part.empty:
            continue
        entry = {"majority_answer": part["answer"].value_counts().idxmax(),
                 "majority_rate": float(part["answer"].value_counts().iloc[0] / len(part))}
        if by_question:
            guess = part["query"].map(by_question)
            entry["same_question_rate"] = float((guess == part["answer"]).mean())
        out[t] = entry
    return out


def evaluate(arch_name: str, model_dir: Path, corpus: Path, *, max_pixels: int, max_tiles: int | None = None,
             limit: int = 0, batch_size: int = 32, train_corpus: Path | None = None, seed: int = 0,
             device: str = "cpu") -> dict:
    """Greedy answers of `model_dir` to the questions of `corpus` (not its captions)."""
    import numpy as np
    import torch
    from swift.infer_engine import InferRequest, RequestConfig, TransformersEngine

    from imatch import score

    arch = archs.get(arch_name)
    corpus = Path(corpus).resolve()
    table = _table(corpus)
    table = table[table["type"].isin(QUESTION_TYPES)].reset_index(drop=True)
    if limit and len(table) > limit:  # a fixed sample, the same for every model
        table = table.iloc[np.sort(np.random.default_rng(seed).choice(len(table), limit, replace=False))]
        table = table.reset_index(drop=True)
    os.environ.update(arch.swift_environment(max_pixels, max_tiles))
    torch.manual_seed(seed)
    model, processor, template = score.load(Path(model_dir), arch, device=device, dtype="float32",
                                            max_pixels=max_pixels, max_tiles=max_tiles, varlen=False,
                                            allow_unsealed=True)
    engine = TransformersEngine(model, template=template, max_batch_size=batch_size)
    requests = [InferRequest(messages=[{"role": "user", "content": q}], images=[str(corpus / img)])
                for q, img in zip(table["query"], table["image"])]
    start = time.time()
    responses = engine.infer(requests, RequestConfig(max_tokens=8, temperature=0), use_tqdm=False)
    wall = time.time() - start
    answers = [r.choices[0].message.content.strip().rstrip(".").lower() for r in responses]
    table = table.assign(predicted=answers, correct=[a == b for a, b in zip(answers, table["answer"])])
    baselines = blind_baselines(train_corpus, table)
    per_type = {}
    for t in QUESTION_TYPES:
        part = table[table["type"] == t]
        if part.empty:
            continue
        per_type[t] = {"n": int(len(part)), "accuracy": float(part["correct"].mean()), **baselines[t],
                       "answers": {k: int(v) for k, v in part["predicted"].value_counts().head(8).items()}}
    return {"model": str(model_dir), "corpus": str(corpus), "questions": int(len(table)),
            "accuracy": float(table["correct"].mean()), "per_type": per_type, "seconds": round(wall, 1)}


def format_report(report: dict) -> str:
    lines = [f"{'type':10} {'n':>5} {'acc':>6} {'major':>6} {'blind':>6}  answers"]
    for t, e in report["per_type"].items():
        lines.append(f"{t:10} {e['n']:5d} {e['accuracy']:6.3f} {e['majority_rate']:6.3f} "
                     f"{e.get('same_question_rate', float('nan')):6.3f}  {e['answers']}")
    lines.append(f"all {report['questions']} questions: {report['accuracy']:.3f} ({report['seconds']} s)")
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI

def add_parser(subparsers) -> None:
    p = subparsers.add_parser("pretrain-tiny", help="pretrain a tiny backbone on the synthetic corpus with swift sft",
                              description=__doc__)
    p.add_argument("--arch", required=True, help="qwen2_5_vl, internvl or ovis2")
    p.add_argument("--corpus", type=Path, required=True, help="folder written by `imatch pretrain-corpus`")
    p.add_argument("--out", type=Path, required=True, help="backbone folder to write (atomically)")
    p.add_argument("--scratch", type=Path, help="working folder (default: <out>.scratch)")
    p.add_argument("--size", default="tiny", help="the architecture's size to build (default tiny)")
    p.add_argument("--seed", type=int, default=0, help="build, initialisation and data order")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--learning-rate", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--lr-scheduler", default="cosine")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-pixels", type=int, default=16384, help="image budget (the demo's: 128 x 128)")
    p.add_argument("--max-tiles", type=int, default=None)
    p.add_argument("--types", nargs="+", default=DEFAULT_TYPES, choices=["caption", *QUESTION_TYPES],
                   help="row types to train on (default: the six question types of every corpus; with the "
                        "captions the tiny InternVL learnt no colour in 2000 steps, without them it began to; "
                        "has_shape and has_colour need a corpus made with --single-attribute, in_context one made with "
                        "--instruction-forms)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where swift trains: cpu (the shipped files; same bytes for the same thread count) or "
                        "cuda (the visible GPU; faster, not byte-reproducible on a CPU)")
    p.add_argument("--workers", type=int, default=0,
                   help="data-loading processes of swift (0: in the trainer's; the number is in the recorded command)")
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--pack", type=Path, help="also write the backbone as one deflated zip to ship")
    p.add_argument("--eval-corpus", type=Path, help="held-out corpus (another seed): report accuracy per type")
    p.add_argument("--eval-limit", type=int, default=600, help="questions of the held-out corpus (0: all)")
    p.add_argument("--keep-scratch", action="store_true")
    p.set_defaults(func=_run)

    e = subparsers.add_parser("pretrain-tiny-eval", help="greedy answers of a backbone to held-out corpus questions",
                              description=__doc__)
    e.add_argument("--arch", required=True)
    e.add_argument("--model", type=Path, required=True)
    e.add_argument("--corpus", type=Path, required=True, help="held-out corpus (another seed than training)")
    e.add_argument("--train-corpus", type=Path, help="the training corpus, for the same-question blind baseline")
    e.add_argument("--max-pixels", type=int, default=16384)
    e.add_argument("--max-tiles", type=int, default=None)
    e.add_argument("--limit", type=int, default=600, help="questions (a fixed sample; 0: all)")
    e.add_argument("--out", type=Path, help="write the report here (JSON)")
    e.set_defaults(func=_run_eval)


def _run(args) -> int:
    if args.scratch is None:
        args.scratch = args.out.with_name(args.out.name + ".scratch")
    record = pretrain(args)
    last = record["loss_curve"][-1] if record["loss_curve"] else {}
    print(json.dumps({"wall_seconds": record["wall_seconds"], "final": last}))
    if args.eval_corpus:
        report = evaluate(args.arch, args.out, args.eval_corpus, max_pixels=args.max_pixels, max_tiles=args.max_tiles,
                          limit=args.eval_limit, train_corpus=args.corpus, device=args.device)
        print(format_report(report))
        write_json(report, args.out.with_name(args.out.name + ".eval.json"))
    return 0


def _run_eval(args) -> int:
    report = evaluate(args.arch, args.model, args.corpus, max_pixels=args.max_pixels, max_tiles=args.max_tiles,
                      limit=args.limit, train_corpus=args.train_corpus)
    print(format_report(report))
    if args.out:
        write_json(report, args.out)
    return 0


if __name__ != "imatch.pretrain_tiny":  # imported by `swift sft --external_plugins <this file>`
    from swift.callbacks import callbacks_map

    callbacks_map[NAME] = _callback
