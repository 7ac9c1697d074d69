"""The wording of every query the models see, in one place (training and scoring share it).

Fig. 2 of the paper: the user query carries the prompt, optional metadata (prompt meaningless,
split confidence, attribute confidence), optionally every element with its level 1-7 (element
augmentation) or the prompt type (prompt type augmentation); the answer is one token.
"""

from __future__ import annotations

import math

IMAGE_TAG = "<image>"
METADATA_FIELDS = {
    "prompt_meaningless": "Prompt meaningless",
    "split_confidence": "Element split uncertain",
    "attribute_confidence": "Attribute confidence",
}
OVERALL_QUESTION = (
    "How well does the image match the prompt? Answer with one letter from a (not at all) to o (perfectly)."
)
ELEMENT_QUESTION = (
    "How well is this element shown in the image? Answer with one digit from 1 (absent) to 7 (clearly present)."
)


def _metadata_lines(row, fields) -> list[str]:
    lines = []
    for field in (f for f in METADATA_FIELDS if f in fields):  # fixed order, whatever the caller's
        value = row[field]
        shown = "unknown" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"
        lines.append(f"{METADATA_FIELDS[field]}: {shown}")
    return lines


def overall_query(row, *, metadata=(), element_levels: list[tuple[str, int]] | None = None) -> str:
    """User turn of the overall-score task (Eq. 3 target: a letter a..o)."""
    lines = [f"Prompt: {row['prompt']}", *_metadata_lines(row, metadata)]
    if element_levels is not None:
        lines.append("Element levels (1 = absent, 7 = clearly present):")
        lines += [f"- {key}: {level}" for key, level in element_levels]
    lines.append(OVERALL_QUESTION)
    return IMAGE_TAG + "\n".join(lines)


def element_query(row, element: str, *, metadata=(), prompt_type: bool = False) -> str:
    """User turn of the element task (Eq. 4 target: a digit 1..7); `element` is the key as given."""
    lines = [f"Prompt: {row['prompt']}"]
    if prompt_type:
        lines.append(f"Prompt type: {row['prompt_type']}")
    lines += _metadata_lines(row, metadata)
    lines.append(f"Element: {element}")
    lines.append(ELEMENT_QUESTION)
    return IMAGE_TAG + "\n".join(lines)
