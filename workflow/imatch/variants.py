"""Content-addressed names of instruction sets, so configurations never collide.

An instruction set's folder is named after a hash of exactly the settings that change it: the
query settings name the folder (`overall-1a2b3c4d/`), shared by every split; settings that only
touch training rows (augmented images, score perturbation) name the training file inside it
(`train-5e6f7a8b.parquet`). Two configurations that differ in a switch thus write to different
artifacts, flipping a switch back reuses what was built, and a switch that only affects training
leaves the evaluation sets alone. Snakemake's rules look the settings up again by hash.
"""

from __future__ import annotations

import hashlib
import json

EVAL_SPLITS = ("holdout", "val", "test")


def digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def augmentation_settings(cfg: dict) -> dict:
    aug = cfg["image_augmentation"]
    return {"fraction": aug["fraction"], "seed": aug["seed"],
            "lighting": list(aug["lighting"]), "grid": list(aug["grid"]), "crop": list(aug["crop"])}


def query_settings(task: str, cfg: dict) -> dict:
    t = cfg[task]
    settings = {"task": task, "metadata": sorted(k for k, on in t["metadata"].items() if on)}
    if task == "overall":
        settings["element_levels"] = bool(t["element_levels"])
    else:
        settings["prompt_type"] = bool(t["prompt_type"])
    return settings


def train_settings(task: str, cfg: dict) -> dict:
    t = cfg[task]
    settings = {"augmentation": augmentation_settings(cfg) if t["image_augmentation"] else None}
    if task == "element":
        p = t["score_perturbation"]
        settings["perturbation"] = (
            {"epsilon": p["epsilon"], "rate": p["rate"], "seed": p["seed"]} if p["enabled"] else None
        )
    return settings


class Registry:
    """Every instruction set a configuration asks for, by name, with its command-line flags."""

    def __init__(self, cfg: dict):
        self.query: dict[str, dict] = {}
        self.train: dict[str, dict] = {}
        self.augment: dict[str, dict] = {}
        for task in ("overall", "element"):
            self.add(task, cfg)

    def add(self, task: str, cfg: dict) -> tuple[str, str]:
        q = query_settings(task, cfg)
        t = train_settings(task, cfg)
        qname, tname = f"{task}-{digest(q)}", digest(t)
        self.query[qname] = q
        self.train[tname] = t
        if t["augmentation"] is not None:
            self.augment[digest(t["augmentation"])] = t["augmentation"]
        return qname, tname

    def query_flags(self, qname: str) -> str:
        q = self.query[qname]
        flags = [f"--task {q['task']}"]
        if q["metadata"]:
            flags.append("--metadata " + " ".join(q["metadata"]))
        if q.get("prompt_type"):
            flags.append("--prompt-type")
        return " ".join(flags)

    def train_flags(self, tname: str) -> str:
        p = self.train[tname].get("perturbation")
        if not p:
            return ""
        return f"--perturb-epsilon {p['epsilon']} --perturb-rate {p['rate']} --perturb-seed {p['seed']}"

    def uses_element_levels(self, qname: str) -> bool:
        return bool(self.query[qname].get("element_levels"))

    def augmentation_of(self, tname: str) -> str | None:
        aug = self.train[tname]["augmentation"]
        return None if aug is None else digest(aug)

    @staticmethod
    def augment_flags(settings: dict) -> str:
        return (f"--fraction {settings['fraction']} --seed {settings['seed']} "
                + " ".join(f"--{k}-range {lo} {hi}" for k in ("lighting", "grid", "crop") for lo, hi in [settings[k]]))
