"""`imatch.Scorer`: score image-prompt pairs with a trained iMatch ensemble, from Python.

    from imatch import Scorer
    scorer = Scorer("path/to/bundle")                 # a bundle (`imatch export`) or a results folder
    df = scorer(images=["a.png", pil_image], prompts=["a red car", "two cats"],
                elements=[["red car (object)"], None])

One row per input, in input order: `total_score` (1-5, the ensemble's mean expected score, Eq. 5-7)
and `elements` (per element key: the mean expected level 1-7 and whether it is a hit, level > tau).
The queries are built as the workflow builds them, with each model's own settings from the bundle
(query metadata, prompt type, element levels predicted by the element models, Eq. 9-10); the
combination is the workflow's (`imatch.ensemble`). Every input is checked before a model loads.
Models load on the first call and stay loaded (`keep_models=False`: one at a time, for ensembles
larger than the device); the GPU is used when there is one.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from imatch import archs, bundle, levels, prompts
from imatch.errors import InputError
from imatch.ingest import TEMPLATE_TAGS, blank_mode_problem, split_element_key
from imatch.instructions import build_element, build_overall

PROMPT_TYPES = ("real", "synthetic")


def _elements_of(value, where: str) -> list[str]:
    """Element keys of one input: a list, a `;`-separated string, or blank (None, NaN, "")."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    if isinstance(value, str):
        keys = [k.strip() for k in value.split(";")]
    elif isinstance(value, (list, tuple, np.ndarray)):
        keys = [str(k).strip() for k in value]
    else:
        raise InputError(where, f"elements must be a list or a ';'-separated string, not {type(value).__name__}")
    keys = [k for k in keys if k]
    for key in keys:
        if split_element_key(key) is None:
            raise InputError(where, f"element {key!r} has no ' (<category>)' suffix, e.g. 'red car (object)'")
        if tag := next((t for t in TEMPLATE_TAGS if t in key), None):
            raise InputError(where, f"element {key!r} holds {tag!r}, which ms-swift's templates read as a tag")
    if len(set(keys)) != len(keys):
        raise InputError(where, f"an element key is listed twice: {keys}")
    return keys


def check_inputs(images, prompts_, elements=None, *, prompt_types=None, metadata=None, label: str = "input"
                 ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Validated (samples, elements) tables in the workflow's layout, one sample per input row
    (keyed by row, so one image may come with several prompts). Raises InputError naming the row."""
    from PIL import Image

    images, prompts_ = list(images), list(prompts_)
    n = len(images)
    if n == 0:
        raise InputError(label, "nothing to score: no images")
    if len(prompts_) != n:
        raise InputError(label, f"{n} images but {len(prompts_)} prompts")
    elements = [None] * n if elements is None else list(elements)
    prompt_types = ["real"] * n if prompt_types is None else list(prompt_types)
    metadata = metadata if metadata is not None else {}
    for name, values in (("elements", elements), ("prompt_types", prompt_types),
                         *((f"metadata {k!r}", v) for k, v in metadata.items())):
        if len(values) != n:
            raise InputError(label, f"{n} images but {len(values)} {name}")
    samples, rows = [], []
    for i in range(n):
        where = f"row {i}"
        image = images[i]
        if isinstance(image, Image.Image):
            name = f"<image {i}>"
            if problem := blank_mode_problem(name, image.mode):
                raise InputError(label, problem, where)
        else:
            path = Path(image)
            name = str(image)
            if not path.is_file():
                raise InputError(label, f"image not found: {path}", where)
            try:
                with Image.open(path) as im:
                    im.load()  # decoded, not only its header
                    mode = im.mode
            except Exception as exc:  # PIL raises many types for unreadable files
                raise InputError(label, f"not a readable image: {path} ({exc})", where) from None
            if problem := blank_mode_problem(path, mode):  # the check ingest makes: one function
                raise InputError(label, problem, where)
        prompt = prompts_[i]
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(label, f"empty prompt (got {prompt!r})", where)
        if tag := next((t for t in TEMPLATE_TAGS if t in prompt), None):
            raise InputError(label, f"prompt holds {tag!r}, which ms-swift's templates read as a tag", where)
        kind = prompt_types[i]
        if kind not in PROMPT_TYPES:
            raise InputError(label, f"prompt type must be one of {list(PROMPT_TYPES)}, not {kind!r}", where)
        key = f"row-{i:07d}"
        sample = {"img_path": key, "prompt_id": key, "prompt": prompt, "prompt_type": kind, "split": "test",
                  "total_score": np.nan, "image": name}
        for field in prompts.METADATA_FIELDS:
            value = metadata.get(field, [None] * n)[i]
            value = np.nan if value is None or (isinstance(value, float) and math.isnan(value)) else value
            if not (isinstance(value, float) and math.isnan(value)):
                if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 <= value <= 1:
                    raise InputError(label, f"{field} must be a number in [0, 1], not {value!r}", where)
            sample[field] = float(value)
        samples.append(sample)
        for element in _elements_of(elements[i], f"{label}: {where}"):
            phrase, category = split_element_key(element)
            rows.append({"img_path": key, "element": element, "phrase": phrase, "category": category,
                         "score": np.nan})
    return (pd.DataFrame(samples),
            pd.DataFrame(rows, columns=["img_path", "element", "phrase", "category", "score"]))


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(device, "asked for a GPU but none is visible")
    return device


def _no_video_hint(record: logging.LogRecord) -> bool:
    """ms-swift's "pip install decord" hint is about video input, which scoring never reads."""
    return "decord" not in record.getMessage()


class Scorer:
    """A trained iMatch ensemble, loaded once, called on images and prompts. `verbose=False`
    quiets ms-swift's and transformers' INFO logs (and torch's FutureWarnings) in this process.
    `share_prefix`: an image's element queries in one packed sequence, its image and prompt encoded
    once (`imatch.prefix`: the same probabilities; `batch_size` then counts images for them)."""

    def __init__(self, source, *, device: str = "auto", dtype: str | None = None, batch_size: int = 8,
                 keep_models: bool = True, verbose: bool = False, share_prefix: bool = True):
        self.bundle = bundle.load(Path(source))
        self.device = pick_device(device)
        self.dtype = dtype or ("bfloat16" if self.device.startswith("cuda") else "float32")
        self.batch_size = batch_size
        self.share_prefix = share_prefix  # element queries of an image in one packed row (exact)
        self.keep_models = keep_models
        self.tau = float(self.bundle["tau"])
        self._loaded: dict[str, tuple] = {}
        if not verbose:  # ms-swift and transformers say much at INFO; the progress bars stay
            os.environ["LOG_LEVEL"] = "WARNING"  # ms-swift's loggers read it when they are made
            for name in ("swift", "transformers"):
                logging.getLogger(name).setLevel(logging.WARNING)
            os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
            if _no_video_hint not in logging.getLogger("swift").filters:
                logging.getLogger("swift").addFilter(_no_video_hint)
            warnings.filterwarnings("ignore", category=FutureWarning, module="torch")  # torch.jit deprecation

    def __call__(self, images, prompts, elements=None, *, prompt_types=None, metadata=None) -> pd.DataFrame:
        images = list(images)  # an iterator is read once
        samples, element_rows = check_inputs(images, prompts, elements, prompt_types=prompt_types, metadata=metadata)
        return self.score(samples, element_rows, images=images)

    def score(self, samples: pd.DataFrame, element_rows: pd.DataFrame, *, images: list) -> pd.DataFrame:
        """Score validated tables (`check_inputs`); `images`: paths or PIL images, one per sample."""
        with tempfile.TemporaryDirectory(prefix="imatch-score-") as tmp:
            samples = samples.copy()
            samples["image"] = [self._image_path(im, i, Path(tmp)) for i, im in enumerate(images)]
            per_element = self._elements(samples, element_rows)
            total = self._overall(samples, element_rows, per_element, Path(tmp))
        out = pd.DataFrame({"image": [str(im) if isinstance(im, (str, Path)) else f"<image {i}>"
                                      for i, im in enumerate(images)],
                            "prompt": samples["prompt"].to_numpy(), "total_score": total})
        grouped = {k: g for k, g in per_element.groupby("img_path")} if len(per_element) else {}
        out["elements"] = [
            [{"element": e.element, "expected_level": float(e.expected_level), "hit": bool(e.hit)}
             for e in grouped[key].itertuples()] if key in grouped else []
            for key in samples["img_path"]]
        return out

    @staticmethod
    def _image_path(image, i: int, tmp: Path) -> str:
        if isinstance(image, (str, Path)):
            return str(Path(image).resolve())
        path = tmp / f"{i:07d}.png"  # lossless: the model sees the pixels it was given
        image.save(path)
        return str(path)

    def _model(self, name: str):
        from imatch.score import load

        if name in self._loaded:
            return self._loaded[name]
        m = self.bundle["models"][name]
        arch = archs.get(m["arch"])
        self._environment(m)
        loaded = load(Path(m["folder"]), arch, device=self.device, dtype=self.dtype,
                      base=Path(m["base"]) if m["base"] else None, max_pixels=m["image_budget"]["max_pixels"],
                      max_tiles=m["image_budget"]["max_tiles"])
        if self.keep_models:
            self._loaded[name] = loaded
        return loaded

    @staticmethod
    def _environment(m: dict) -> None:
        """The environment ms-swift's templates read, as `imatch score-set` sets it for this model."""
        budget = m["image_budget"]
        os.environ.update(archs.get(m["arch"]).swift_environment(budget["max_pixels"], budget["max_tiles"]))

    def _expected(self, name: str, table: pd.DataFrame, task: str) -> np.ndarray:
        from imatch.score import ScoringError, score_table

        m = self.bundle["models"][name]
        model, processor, template = self._model(name)
        self._environment(m)
        try:
            out = score_table(table, model, processor, template, task=task, batch_size=self.batch_size, tau=self.tau,
                              share_prefix=self.share_prefix)
        except ScoringError as exc:  # a diverged model: named, with the caller's image, nothing returned
            names = dict(zip(table["img_path"], table["image"]))
            message = re.sub(r"row-(\d{7})", lambda k: f"row {int(k[1])} ({names.get(k[0], '?')})", str(exc))
            raise InputError(m["folder"], f"scoring {task} queries: {message}") from None
        finally:
            if not self.keep_models:
                del model
        if not (out["id"].to_numpy() == table["id"].to_numpy()).all():
            raise AssertionError("scores came back in another order than their queries")
        return out["expected_level"].to_numpy(dtype=float)

    def _element_queries(self, name: str, samples, element_rows) -> pd.DataFrame:
        s = self.bundle["models"][name]["settings"]
        return build_element(samples, element_rows, "test", metadata=s["metadata"], prompt_type=s["prompt_type"])

    def _elements(self, samples, element_rows) -> pd.DataFrame:
        """Per element: the ensemble's mean expected level and hit, and the level (1..7) that the
        element-level models give the overall queries (`element_levels`)."""
        if element_rows.empty:
            return pd.DataFrame(columns=["img_path", "element", "expected_level", "hit", "level"])
        names = list(dict.fromkeys(self.bundle["element"]["members"] + (self.bundle["element_levels_from"] or [])))
        expected = {}
        for name in names:
            queries = self._element_queries(name, samples, element_rows)
            expected[name] = pd.Series(self._expected(name, queries, "element"),
                                       index=pd.MultiIndex.from_frame(queries[["img_path", "element"]]))
        keys = pd.MultiIndex.from_frame(element_rows[["img_path", "element"]])  # the caller's order
        members, weights = self.bundle["element"]["members"], self.bundle["element"]["weights"]
        mean = sum(w * expected[n].reindex(keys) for n, w in zip(members, weights))
        out = pd.DataFrame({"expected_level": mean.to_numpy()}, index=keys).reset_index()
        out["hit"] = levels.is_hit(out["expected_level"].to_numpy(), self.tau)
        if self.bundle["element_levels_from"]:  # the workflow's element_levels: mean, rounded half-up
            sources = self.bundle["element_levels_from"]
            lv = sum(expected[n].reindex(keys) for n in sources) / len(sources)
            out["level"] = np.clip(levels.round_half_up(lv.to_numpy()), 1, 7).astype("int64")
        return out

    def _overall(self, samples, element_rows, per_element, tmp: Path) -> np.ndarray:
        levels_table = None
        if "level" in per_element and len(per_element):
            levels_table = tmp / "element_levels.parquet"
            per_element[["img_path", "element", "level"]].to_parquet(levels_table)
        members, weights = self.bundle["overall"]["members"], self.bundle["overall"]["weights"]
        total = np.zeros(len(samples))
        for name, w in zip(members, weights):
            s = self.bundle["models"][name]["settings"]
            stated = None
            if s["element_levels"]:
                if levels_table is None and len(element_rows):
                    raise InputError(name, "the model states element levels but the bundle names no element-level models")
                # no elements for an image: the query states an empty list, as for such images in the workflow
                stated = str(levels_table) if levels_table is not None else _empty_levels(tmp)
            queries = build_overall(samples, element_rows, "test", metadata=s["metadata"], element_levels=stated)
            order = pd.Series(range(len(queries)), index=queries["img_path"])
            expected = self._expected(name, queries, "overall")
            total += w * levels.level_to_total(expected[order.reindex(samples["img_path"]).to_numpy()])
        return total


def _empty_levels(tmp: Path) -> str:
    path = tmp / "no_element_levels.parquet"
    pd.DataFrame({"img_path": pd.Series([], dtype=str), "element": pd.Series([], dtype=str),
                  "level": pd.Series([], dtype="int64")}).to_parquet(path)
    return str(path)
