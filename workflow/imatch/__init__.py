"""iMatch: instruction-augmented multimodal alignment, reproduced as a Snakemake workflow.

`from imatch import Scorer` scores image-prompt pairs with a trained ensemble (`imatch.scorer`).
"""

__version__ = "0.1.0"


def __getattr__(name):
    if name == "Scorer":  # imported on use: the package's CLI stages do not pay for torch and ms-swift
        from imatch.scorer import Scorer

        return Scorer
    raise AttributeError(f"module 'imatch' has no attribute {name!r}")
