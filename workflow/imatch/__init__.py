"""iMatch: instruction-augmented multimodal alignment, reproduced as a Snakemake workflow."""

__version__ = "0.1.0"
