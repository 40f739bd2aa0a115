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
