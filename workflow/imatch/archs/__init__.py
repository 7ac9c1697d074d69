"""The three backbone architectures of the paper, each behind one small interface.

An `Arch` says how ms-swift knows the model (model type, template, plug-in), how images are
sized, which modules a fine-tune may train, and how to build a random-weight backbone offline
(a tiny one for tests and the demo, or one of the real size for GPU benchmarks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Arch:
    name: str
    swift_model_type: str
    swift_template: str
    build: Callable  # build(out_dir, size, seed) -> None
    sizes: tuple[str, ...]
    # modules trained besides LoRA when the recipe asks for a trainable head (random tiny models)
    head_modules: tuple[str, ...] = ()
    env: dict = field(default_factory=dict)  # image sizing env vars read by ms-swift
    plugin: str | None = None  # module registering the model with ms-swift (--external_plugins)
    # Tiling architectures: the env var their ms-swift template reads for the most tiles per image
    # (after the template's max_pixels shrink) and ms-swift's default, which the paper ran with.
    tiles_env: str | None = None
    default_tiles: int | None = None

    def tiles_environment(self, max_tiles: int | None) -> dict:
        """Env vars that set the tile budget (`max_tiles`: None = the default) for ms-swift."""
        if max_tiles is None:
            return {self.tiles_env: str(self.default_tiles)} if self.tiles_env else {}
        if not self.tiles_env:
            raise ValueError(f"{self.name} does not tile images: its image budget is max_pixels alone")
        if max_tiles < 1:
            raise ValueError(f"max_tiles must be >= 1, got {max_tiles}")
        return {self.tiles_env: str(max_tiles)}

    def swift_environment(self, max_pixels: int | None, max_tiles: int | None) -> dict:
        """Every env var ms-swift's loaders and templates read for this image budget: the
        architecture's, the tile budget, and MAX_PIXELS (Qwen2.5-VL's own resize; harmless for
        the others). One place for training, scoring, the length check and the Scorer."""
        return {**self.env, **self.tiles_environment(max_tiles),
                **({"MAX_PIXELS": str(max_pixels)} if max_pixels else {})}


def save_backbone(out, model, processor) -> None:
    """Write a built backbone in the layout transformers and ms-swift load from a folder."""
    from pathlib import Path

    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    model.generation_config.save_pretrained(out)


def get(name: str) -> Arch:
    from imatch.archs import internvl

    registry = {a.name: a for a in (internvl.ARCH,)}
    for optional in ("qwen2_5_vl", "ovis2"):
        try:
            module = __import__(f"imatch.archs.{optional}", fromlist=["ARCH"])
            registry[module.ARCH.name] = module.ARCH
        except ModuleNotFoundError:
            pass
    if name not in registry:
        raise ValueError(f"unknown architecture {name!r}; known: {sorted(registry)}")
    return registry[name]
