"""InternVL 1 (InternVL-Chat-V1-1, V1-2, V1-2-Plus): its templates, its one-tile media and its prompt expansion.

Sources, read for the facts (OpenGVLab/InternVL unless named):
- internvl_chat/internvl/conversation.py. `vicuna_v1.1` (FastChat's, present up to InternVL 1.5, e.g. commit 0556aa8;
  removed with InternVL 2.0): system message "A chat between ... questions.", roles USER / ASSISTANT, ADD_COLON_TWO,
  sep " ", sep2 "</s>". `internvl_zh`, registered under the comment "InternVL-Chat-V1-1 template" (commit 5d47fdf):
  no system message, roles <human> / <bot>, INTERNVL_ZH with sep " " and sep2 "</s>" (9807c9f; later written as
  sep "</s>", sep2 " " with the two swapped in get_prompt, which renders the same). LMDeploy's lmdeploy/model.py
  (InternLM/lmdeploy, before 967df47f5) matches InternVL-Chat-V1-1 to its `internvl-zh` template: "<human>: ",
  " ", "<bot>: ", "</s>".
- `Hermes-2` for V1-2: commit 88a146c ("Release InternVL-Chat-V1.2") gives it system message "Answer the
  questions.", and its fine-tune script (internvl_chat/internvl/train/internvl_chat_finetune.py) renders every
  sample with the template's own message; LMDeploy's `internvl-zh-hermes2` (matched to InternVL-Chat-V1-2) has the
  same. InternVL 2.0 (0dc48a2) changed Hermes-2's message to the Chinese one InternVL2-40B uses.
- Media: the InternVL-Chat-V1-1 / V1-2 quick starts (czczup/InternVL-doc docs/en/internvl1.1/quick_start.md,
  docs/en/internvl1.2/quick_start.md) feed `Image.open(...).resize((448, 448))` through CLIPImageProcessor, and the
  evaluation transform of that time (internvl_chat/internvl/train/dataset.py at 88a146c, build_transform with
  pad2square False) is `Resize((448, 448), BICUBIC)`, ToTensor, Normalize(ImageNet): a plain resize, no crop, no
  thumbnail. internvl_chat/shell/internvl1.2/2nd_finetune/internvl_chat_v1_2_hermes2_yi34b_448_res_2nd_finetune_full.sh
  fine-tunes V1-2-Plus with force_image_size 448, max_dynamic_patch 1, dynamic_image_size False, use_thumbnail
  False, ps_version v1, vision_select_layer -1, conv_style Hermes-2; InternVLChatConfig's defaults
  (configuration_internvl_chat.py) are dynamic_image_size False, use_thumbnail False, ps_version v1.
- Image tokens: modeling_internvl_chat.py (88a146c) chat(): `<img>` + `<IMG_CONTEXT>` x num_image_token + `</img>`,
  then "\n" and the question; num_image_token = (448 // 14) ** 2 * 0.5 ** 2 = 256.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from batchvl.media.fetch import Blob
from batchvl.media.pixels import TileTask, tile_media
from batchvl.models.checkpoint import CheckpointInfo
from batchvl.prepare.prompt import PromptBuilder, place_images
from batchvl.prepare.templates import ConversationTemplate, default_system_message, get_template
from batchvl.tools.tiny import build_tokenizer

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
Q1 = "<image>\nDescribe the image."
A1 = "A cat on a sofa."
Q2 = "What colour is the cat?"


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


# --- templates ------------------------------------------------------------------------------------------------

def test_vicuna_v1_1_renders_fastchats_prompt_and_stops_at_eos():
    t = get_template("vicuna_v1.1")
    assert t.render([user(Q1)]) == f"{VICUNA_SYSTEM} USER: {Q1} ASSISTANT:"
    assert t.render([user(Q1), assistant(A1), user(Q2)]) == (
        f"{VICUNA_SYSTEM} USER: {Q1} ASSISTANT: {A1}</s>USER: {Q2} ASSISTANT:")
    assert t.render([{"role": "system", "content": "Be brief."}, user("Hi")]) == "Be brief. USER: Hi ASSISTANT:"
    assert (t.sep, t.sep2, t.eos_token, t.stop_strings) == (" ", "</s>", "</s>", ("</s>",))


def test_internvl_zh_renders_internvl_chat_v1_1s_prompt():
    t = get_template("internvl_zh")
    # No system message: the prompt starts with the first separator, a space.
    assert t.render([user(Q1)]) == f" <human>: {Q1} <bot>:"
    assert t.render([user(Q1), assistant(A1), user(Q2)]) == f" <human>: {Q1} <bot>: {A1}</s><human>: {Q2} <bot>:"
    assert t.render([user(Q1)], system_message="S") == f"S <human>: {Q1} <bot>:"
    assert (t.eos_token, t.stop_strings) == ("</s>", ("</s>",))


def test_colon_style_empty_turn_and_closed_conversation():
    # get_prompt(): an empty message gives `role:` alone; a finished conversation ends with sep2.
    t = get_template("vicuna_v1.1")
    assert t.render([user(""), assistant(A1), user(Q2)], system_message="S") == (
        f"S USER:ASSISTANT: {A1}</s>USER: {Q2} ASSISTANT:")
    assert t.render([user(Q1), assistant(A1)], add_generation_prompt=False, system_message="S") == (
        f"S USER: {Q1} ASSISTANT: {A1}</s>")
    with pytest.raises(ValueError, match="sep2 must not be blank"):
        ConversationTemplate("bad", "{system_message}", "", ("U", "A"), " ", (), sep2=" ")


@pytest.mark.parametrize("dynamic, expected", [(False, "Answer the questions."), (None, "Answer the questions."),
                                               (True, "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，"
                                                      "英文名叫InternVL, 是一个有用无害的人工智能助手。")])
def test_hermes_2_system_message_is_v1_2s_without_tiling_and_internvl2_40bs_with_it(dynamic, expected):
    config = {"template": "Hermes-2", "llm_config": {}}
    if dynamic is not None:
        config["dynamic_image_size"] = dynamic
    assert default_system_message("Hermes-2", config) == expected
    assert default_system_message("Hermes-2", dict(config, system_message="Own.")) == "Own."


# --- one 448x448 tile and 256 image tokens ------------------------------------------------------------------

def v1_2_config(**extra) -> dict:
    """InternVL-Chat-V1-2's tiling keys and InternViT-6B-448px-V1-2's patching (no weights needed here)."""
    return {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "template": "Hermes-2",
            "force_image_size": 448, "downsample_ratio": 0.5, "ps_version": "v1", "select_layer": -1,
            "dynamic_image_size": False, "use_thumbnail": False, "min_dynamic_patch": 1, "max_dynamic_patch": 6,
            "llm_config": {"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 4096},
            "vision_config": {"image_size": 448, "patch_size": 14}, **extra}


def test_internvl1_image_is_one_plain_448_resize_with_256_tokens(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(v1_2_config()))
    ck = CheckpointInfo.read(tmp_path)
    assert (ck.tile_size, ck.min_dynamic_patch, ck.max_dynamic_patch, ck.use_thumbnail) == (448, 1, 1, False)
    assert ck.tokens_per_tile == 256
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 1000, 3), dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    task = TileTask(Blob("wide.png", data=buf.getvalue()), "image", ck.min_dynamic_patch, ck.max_dynamic_patch,
                    ck.use_thumbnail, ck.tile_size, None)
    (tiles,), _ = tile_media(task)
    # The quick start's `image.resize((448, 448))`: Pillow's default resample for RGB is bicubic.
    assert tiles.shape == (1, 448, 448, 3)
    assert np.array_equal(tiles[0], np.asarray(image.resize((448, 448))))


def test_dynamic_tiling_on_keeps_the_configs_tiles(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(v1_2_config(dynamic_image_size=True, use_thumbnail=True)))
    ck = CheckpointInfo.read(tmp_path)
    assert (ck.max_dynamic_patch, ck.use_thumbnail) == (6, True)


def test_internvl1_prompt_expands_each_image_to_img_256_context_tokens(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(v1_2_config()))
    ck = CheckpointInfo.read(tmp_path)
    system = default_system_message(ck.template_name, ck.config)
    builder = PromptBuilder(build_tokenizer(), get_template(ck.template_name), ck.tokens_per_tile, system)
    got = builder.expand(builder.render(place_images("What is it?", 1)), [1])
    image = "<img>" + "<IMG_CONTEXT>" * 256 + "</img>"
    assert got == ("<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n"
                   f"{image}\nWhat is it?<|im_end|><|im_start|>assistant\n")


@pytest.mark.parametrize("media,column,refused", [
    ({}, None, None),
    ({"max_dynamic_patch": 1}, None, None),
    ({"max_dynamic_patch": 12}, None, "media.max_dynamic_patch: 12 tiles asked for, but this checkpoint does not tile"),
    ({"min_dynamic_patch": 2, "max_dynamic_patch": 6}, None, "media.max_dynamic_patch: 6 tiles"),
    ({"video_max_dynamic_patch": 4}, None, "media.video_max_dynamic_patch: 4 tiles"),
    ({}, "tiles", "input.max_dynamic_patch_column: this checkpoint does not tile"),
])
def test_a_checkpoint_that_does_not_tile_refuses_settings_that_would_tile(tmp_path, media, column, refused):
    """InternVL 1 was trained on one 448 px resize per image: tiles asked of it are refused at plan time, in one line
    naming the key, rather than fed to it (or silently dropped)."""
    from types import SimpleNamespace

    from batchvl.config.spec import MediaSpec
    from batchvl.errors import JobError
    from batchvl.run.plan import _check_tiling

    (tmp_path / "config.json").write_text(json.dumps(v1_2_config()))
    job = SimpleNamespace(media=MediaSpec(**media), input=SimpleNamespace(max_dynamic_patch_column=column))
    if refused is None:
        _check_tiling(job, CheckpointInfo.read(tmp_path))
    else:
        with pytest.raises(JobError, match=refused.replace(".", r"\.")):
            _check_tiling(job, CheckpointInfo.read(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(v1_2_config(dynamic_image_size=True)))
    _check_tiling(job, CheckpointInfo.read(tmp_path))  # a tiling checkpoint takes them all
