"""The query wording (Fig. 2 of the paper): exact strings, written out here by hand, not rebuilt with
the module's own helpers, so a changed word, value, order or line break fails."""

from __future__ import annotations

import math

import pytest

from imatch import prompts

ROW = {"prompt": "A puffin in a booth", "prompt_type": "real", "prompt_meaningless": 0.0,
       "split_confidence": 1 / 3, "attribute_confidence": 0.666666}
OVERALL_Q = "How well does the image match the prompt? Answer with one letter from a (not at all) to o (perfectly)."
ELEMENT_Q = ("How well is this element shown in the image? Answer with one digit from 1 (absent) to 7 "
             "(clearly present).")


def test_overall_query_without_switches_is_image_prompt_question():
    assert prompts.overall_query(ROW) == "<image>Prompt: A puffin in a booth\n" + OVERALL_Q
    assert prompts.OVERALL_QUESTION == OVERALL_Q and prompts.IMAGE_TAG == "<image>"


def test_metadata_lines_show_each_value_to_two_decimals_in_a_fixed_order():
    # the caller's order does not matter: prompt_meaningless, split_confidence, attribute_confidence
    q = prompts.overall_query(ROW, metadata=("attribute_confidence", "prompt_meaningless", "split_confidence"))
    assert q == ("<image>Prompt: A puffin in a booth\n"
                 "Prompt meaningless: 0.00\n"
                 "Element split uncertain: 0.33\n"
                 "Attribute confidence: 0.67\n" + OVERALL_Q)
    # only the fields asked for
    assert prompts.overall_query(ROW, metadata=("split_confidence",)) == (
        "<image>Prompt: A puffin in a booth\nElement split uncertain: 0.33\n" + OVERALL_Q)


@pytest.mark.parametrize("missing", [None, math.nan])
def test_a_missing_metadata_value_is_shown_as_unknown(missing):
    row = dict(ROW, split_confidence=missing)
    assert prompts.overall_query(row, metadata=("split_confidence",)) == (
        "<image>Prompt: A puffin in a booth\nElement split uncertain: unknown\n" + OVERALL_Q)
    # a value of 0 is a value, not unknown
    assert "Element split uncertain: 0.00" in prompts.overall_query(dict(ROW, split_confidence=0.0),
                                                                    metadata=("split_confidence",))


def test_element_levels_follow_the_metadata_in_the_given_order():
    q = prompts.overall_query(ROW, metadata=("prompt_meaningless",),
                              element_levels=[("puffin (animal)", 7), ("booth (location)", 1)])
    assert q == ("<image>Prompt: A puffin in a booth\n"
                 "Prompt meaningless: 0.00\n"
                 "Element levels (1 = absent, 7 = clearly present):\n"
                 "- puffin (animal): 7\n"
                 "- booth (location): 1\n" + OVERALL_Q)
    # an image without elements still states the (empty) block when levels are switched on
    assert prompts.overall_query(ROW, element_levels=[]) == (
        "<image>Prompt: A puffin in a booth\nElement levels (1 = absent, 7 = clearly present):\n" + OVERALL_Q)


def test_element_query_exact_text_with_and_without_switches():
    assert prompts.element_query(ROW, "puffin (animal)") == (
        "<image>Prompt: A puffin in a booth\nElement: puffin (animal)\n" + ELEMENT_Q)
    assert prompts.element_query(ROW, "puffin (animal)", prompt_type=True,
                                 metadata=("split_confidence", "prompt_meaningless")) == (
        "<image>Prompt: A puffin in a booth\n"
        "Prompt type: real\n"
        "Prompt meaningless: 0.00\n"
        "Element split uncertain: 0.33\n"
        "Element: puffin (animal)\n" + ELEMENT_Q)
    assert prompts.ELEMENT_QUESTION == ELEMENT_Q
    assert prompts.METADATA_FIELDS == {"prompt_meaningless": "Prompt meaningless",
                                       "split_confidence": "Element split uncertain",
                                       "attribute_confidence": "Attribute confidence"}
