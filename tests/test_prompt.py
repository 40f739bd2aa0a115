"""Placeholders, field filling and stop handling."""

from __future__ import annotations

import pytest

from batchvl.core import FINISH_LENGTH, FINISH_STOP
from batchvl.engine.base import GenerationParams, finish
from batchvl.errors import RowError
from batchvl.prepare.prompt import fill_fields, place_images


def test_images_without_placeholder_are_prepended_once_each():
    assert place_images("Describe.", 2) == "<image>\n<image>\nDescribe."
    assert place_images("Describe.", 0) == "Describe."


def test_lmdeploy_image_token_is_accepted():
    assert place_images("A <IMAGE_TOKEN> and <image>", 2) == "A <image> and <image>"


def test_placeholder_count_must_match_images():
    with pytest.raises(RowError, match="2 <image> placeholder"):
        place_images("<image><image>", 1)
    with pytest.raises(RowError, match="1 <image> placeholder"):
        place_images("<image>", 0)


def test_fields_fill_from_row_and_leave_other_braces():
    assert fill_fields("Describe {name}: {\"k\": 1} {0}", {"name": "x"}) == "Describe x: {\"k\": 1} {0}"
    with pytest.raises(RowError, match="no column 'other'"):
        fill_fields("{other}", {})


def test_finish_cuts_after_the_first_stop_token():
    params = GenerationParams(max_new_tokens=5, eos_token_ids=(2,), stop_token_ids=(9,))
    assert finish([5, 6, 9, 7, 2], params) == ([5, 6, 9], FINISH_STOP)
    assert finish([5, 6, 7], params) == ([5, 6, 7], FINISH_LENGTH)
    assert finish([2], params) == ([2], FINISH_STOP)


@pytest.mark.parametrize("template", [None, "Hermes-2", "internlm2-chat", "phi3-chat", "internvl2_5"])
def test_prompt_ids_are_those_of_the_fully_expanded_prompt(template):
    """encode_messages tokenizes each image's run with one context token and widens it after; the ids must be
    exactly those of tokenizing the full run, whatever sits next to the images (text, special tokens, escapes of
    the row's own special-token text, several images of different tile counts, text-only turns)."""
    from batchvl.prepare.prompt import PromptBuilder
    from batchvl.prepare.templates import get_template
    from batchvl.tools.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    builder = PromptBuilder(tokenizer, get_template(template) if template else None, tokens_per_tile=16)
    cases = [
        ([{"role": "user", "content": "<image>\nDescribe."}], [7]),
        ([{"role": "user", "content": "A<image>B <image>\n\n<image>end"}], [1, 13, 3]),
        ([{"role": "user", "content": "Frame1: <image>\nFrame2: <image>\nWhat happens? <|im_end|> </s>"}], [1, 1]),
        ([{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "A cat."},
          {"role": "user", "content": "And <image>?"}], [2, 5]),
        ([{"role": "user", "content": "no images here"}], []),
    ]
    for messages, tiles in cases:
        full = builder.expand(builder.render_messages(messages), tiles)
        want = builder._tokenize(full)
        assert builder.encode_messages(messages, tiles) == want, (messages, tiles)
