"""Stage `augment`: image augmentation of a seeded 10% of training images (Sec. 3.2.4, Eq. 11-15).

Each chosen image gets exactly one of three transforms, with its strength drawn uniformly from the
paper's range:
- lighting (Eq. 11): brightness shifted by alpha ~ U(0.1, 0.5), brighter or darker with equal odds;
- grid (Eq. 12): grid distortion with per-line distortion up to beta ~ U(0.2, 0.8);
- crop (Eq. 13): a random crop that removes a fraction gamma ~ U(0.1, 0.5) of the area (aspect
  kept), resized back to the original size.
The transforms are albumentations', each image seeded from (seed, its img_path), so the output is
the same bytes for the same inputs. Augmented images are written once as PNG files; the table
records the transform and parameter of each. Labels are those of the original image (the paper's
D_final = D_train U D_aug), also for crops that may cut an element out.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from imatch.atomic import atomic_path, write_parquet
from imatch.errors import InputError

TRANSFORMS = ("lighting", "grid", "crop")
DEFAULT_RANGES = {"lighting": (0.1, 0.5), "grid": (0.2, 0.8), "crop": (0.1, 0.5)}
COLUMNS = ["img_path", "aug_id", "image", "augmentation", "parameter", "sign"]


def _seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:4], "little")


def choose(img_paths, fraction: float, seed: int) -> list[str]:
    """A seeded, input-order-independent choice of round(fraction * n) training images."""
    paths = sorted(set(img_paths))
    n = int(round(fraction * len(paths)))
    rng = np.random.default_rng(seed)
    return sorted(np.asarray(paths, dtype=object)[rng.permutation(len(paths))[:n]].tolist())


def build_transform(name: str, value: float, sign: int, height: int, width: int):
    """The albumentations transform for one image (imported here: it is slow to import)."""
    import albumentations as A
    import cv2

    if name == "lighting":
        shift = sign * value
        return A.RandomBrightnessContrast(brightness_limit=(shift, shift), contrast_limit=(0.0, 0.0), p=1.0)
    if name == "grid":
        return A.GridDistortion(num_steps=5, distort_limit=(-value, value), border_mode=cv2.BORDER_REFLECT_101, p=1.0)
    if name == "crop":
        keep = 1.0 - value
        ratio = width / height
        return A.RandomResizedCrop(size=(height, width), scale=(keep, keep), ratio=(ratio, ratio), p=1.0)
    raise ValueError(f"unknown transform {name!r}")


def augment(samples: pd.DataFrame, out_dir: Path, *, fraction: float, seed: int, ranges=DEFAULT_RANGES,
            transforms=TRANSFORMS) -> pd.DataFrame:
    train = samples[samples["split"] == "train"].set_index("img_path")
    chosen = choose(train.index, fraction, seed)
    rows = []
    for img_path in tqdm(chosen, desc="augment", unit="img", mininterval=2):
        rng = np.random.default_rng(_seed(seed, img_path))
        name = transforms[int(rng.integers(len(transforms)))]
        lo, hi = ranges[name]
        value = float(rng.uniform(lo, hi))
        sign = int(rng.choice([-1, 1])) if name == "lighting" else 1
        source = Path(train.loc[img_path, "image"])
        try:
            with Image.open(source) as im:
                image = np.asarray(im.convert("RGB"))
        except Exception as exc:
            raise InputError(source, f"unreadable image: {exc}", f"img_path={img_path!r}") from None
        from albumentations import Compose

        pipeline = Compose([build_transform(name, value, sign, *image.shape[:2])], seed=_seed(seed, "t:" + img_path))
        result = pipeline(image=image)["image"]
        rel = Path(name) / Path(img_path).with_suffix(".png")
        target = out_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            Image.fromarray(result).save(tmp, format="PNG")
        rows.append({"img_path": img_path, "aug_id": f"{img_path}#{name}", "image": str(target.resolve()),
                     "augmentation": name, "parameter": value, "sign": sign})
    return pd.DataFrame(rows, columns=COLUMNS)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("augment", help="image augmentation of a seeded fraction of training images",
                              description=__doc__)
    p.add_argument("--samples", type=Path, required=True, help="samples.parquet from ingest")
    p.add_argument("--out", type=Path, required=True, help="augmented.parquet to write")
    p.add_argument("--images", type=Path, required=True, help="folder for the augmented PNG files")
    p.add_argument("--fraction", type=float, default=0.1, help="fraction of training images (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    for name, (lo, hi) in DEFAULT_RANGES.items():
        p.add_argument(f"--{name}-range", type=float, nargs=2, default=[lo, hi], metavar=("LOW", "HIGH"),
                       help=f"uniform range of the {name} parameter (default: %(default)s)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    ranges = {name: tuple(getattr(args, f"{name}_range")) for name in DEFAULT_RANGES}
    for name, (lo, hi) in ranges.items():
        if not lo <= hi:
            raise ValueError(f"--{name}-range: LOW must not exceed HIGH")
    samples = pd.read_parquet(args.samples)
    with atomic_path(args.images, directory=True) as tmp:
        table = augment(samples, tmp, fraction=args.fraction, seed=args.seed, ranges=ranges)
        # paths point at the final folder, not the temporary one
        table["image"] = [str(args.images.resolve() / Path(p).relative_to(tmp.resolve())) for p in table["image"]]
    write_parquet(table, args.out)
    print(json.dumps(table["augmentation"].value_counts().sort_index().to_dict()))
    return 0
