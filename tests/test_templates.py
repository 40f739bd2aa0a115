"""InternVL conversation templates: rendering against hand-derived strings from OpenGVLab's conversation.py."""

from __future__ import annotations

import pytest

from batchvl.prepare.templates import TEMPLATES, ConversationTemplate, default_system_message, get_template

# Written out here rather than imported, so a typo in batchvl/templates.py fails the tests.
V2_SYSTEM = ("你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，"
             "英文名叫InternVL, 是一个有用无害的人工智能助手。")
V25_SYSTEM = ("你是书生·万象，英文名是InternVL，"
              "是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。")

Q1 = "<image>\nDescribe the image."
A1 = "A cat on a sofa."
Q2 = "What colour is the cat?"

ALL = ("internlm2-chat", "Hermes-2", "phi3-chat", "internvl2_5")  # the MPT-style templates
COLON = ("vicuna_v1.1", "internvl_zh")  # InternVL 1's two-separator templates (tests/test_internvl1.py)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


# --- the published facts, per template ----------------------------------------------------------------------

FACTS = {
    "internlm2-chat": ("<|im_start|>system\n{system_message}", V2_SYSTEM,
                       ("<|im_start|>user\n", "<|im_start|>assistant\n"), "<|im_end|>", ("<|im_end|>",)),
    "Hermes-2": ("<|im_start|>system\n{system_message}", V2_SYSTEM,
                 ("<|im_start|>user\n", "<|im_start|>assistant\n"), "<|im_end|>", ("<|im_end|>", "<|endoftext|>")),
    "phi3-chat": ("<|system|>\n{system_message}", V2_SYSTEM,
                  ("<|user|>\n", "<|assistant|>\n"), "<|end|>", ("<|end|>",)),
    "internvl2_5": ("<|im_start|>system\n{system_message}", V25_SYSTEM,
                    ("<|im_start|>user\n", "<|im_start|>assistant\n"), "<|im_end|>\n", ("<|im_end|>",)),
}


def test_registry_holds_exactly_the_supported_templates():
    assert set(TEMPLATES) == set(ALL + COLON)
    assert all(TEMPLATES[name].name == name for name in TEMPLATES)


@pytest.mark.parametrize("name", ALL)
def test_template_fields(name):
    t = get_template(name)
    assert (t.system_template, t.default_system_message, t.roles, t.sep, t.stop_strings) == FACTS[name]


@pytest.mark.parametrize("name, eos", [("internlm2-chat", "<|im_end|>"), ("Hermes-2", "<|im_end|>"),
                                       ("phi3-chat", "<|end|>"), ("internvl2_5", "<|im_end|>")])
def test_eos_token_is_sep_stripped(name, eos):
    t = get_template(name)
    assert t.eos_token == eos == t.sep.strip()
    assert t.stop_strings[0] == eos
    assert not any(s != s.strip() for s in t.stop_strings)


@pytest.mark.parametrize("name", ["internlm2-chat", "Hermes-2", "phi3-chat"])
def test_internvl2_templates_carry_internvl2s_published_system_message(name):
    for produced in (default_system_message(name), get_template(name).default_system_message):
        assert produced == V2_SYSTEM
        assert "InternVL, 是" in produced  # ASCII comma and space, as published
        assert "InternVL，" not in produced


def test_internvl2_5_template_carries_its_own_published_system_message():
    for produced in (default_system_message("internvl2_5"), get_template("internvl2_5").default_system_message):
        assert produced == V25_SYSTEM != V2_SYSTEM
        assert "InternVL，是" in produced  # full-width comma
        assert "InternVL, " not in produced


# --- literal expected prompts, derived by hand ---------------------------------------------------------------

SINGLE = {
    "internlm2-chat": f"<|im_start|>system\n{V2_SYSTEM}<|im_end|><|im_start|>user\n{Q1}<|im_end|>"
                      "<|im_start|>assistant\n",
    "Hermes-2": f"<|im_start|>system\n{V2_SYSTEM}<|im_end|><|im_start|>user\n{Q1}<|im_end|><|im_start|>assistant\n",
    "phi3-chat": f"<|system|>\n{V2_SYSTEM}<|end|><|user|>\n{Q1}<|end|><|assistant|>\n",
    "internvl2_5": f"<|im_start|>system\n{V25_SYSTEM}<|im_end|>\n<|im_start|>user\n{Q1}<|im_end|>\n"
                   "<|im_start|>assistant\n",
}

MULTI = {
    "internlm2-chat": f"<|im_start|>system\n{V2_SYSTEM}<|im_end|><|im_start|>user\n{Q1}<|im_end|>"
                      f"<|im_start|>assistant\n{A1}<|im_end|><|im_start|>user\n{Q2}<|im_end|><|im_start|>assistant\n",
    "Hermes-2": f"<|im_start|>system\n{V2_SYSTEM}<|im_end|><|im_start|>user\n{Q1}<|im_end|>"
                f"<|im_start|>assistant\n{A1}<|im_end|><|im_start|>user\n{Q2}<|im_end|><|im_start|>assistant\n",
    "phi3-chat": f"<|system|>\n{V2_SYSTEM}<|end|><|user|>\n{Q1}<|end|><|assistant|>\n{A1}<|end|>"
                 f"<|user|>\n{Q2}<|end|><|assistant|>\n",
    "internvl2_5": f"<|im_start|>system\n{V25_SYSTEM}<|im_end|>\n<|im_start|>user\n{Q1}<|im_end|>\n"
                   f"<|im_start|>assistant\n{A1}<|im_end|>\n<|im_start|>user\n{Q2}<|im_end|>\n"
                   "<|im_start|>assistant\n",
}

CUSTOM = {
    "internlm2-chat": f"<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\n{Q1}<|im_end|>"
                      "<|im_start|>assistant\n",
    "Hermes-2": f"<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\n{Q1}<|im_end|><|im_start|>assistant\n",
    "phi3-chat": f"<|system|>\nBe brief.<|end|><|user|>\n{Q1}<|end|><|assistant|>\n",
    "internvl2_5": f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{Q1}<|im_end|>\n"
                   "<|im_start|>assistant\n",
}


@pytest.mark.parametrize("name", ALL)
def test_single_turn(name):
    assert get_template(name).render([user(Q1)]) == SINGLE[name]


@pytest.mark.parametrize("name", ALL)
def test_multi_turn_with_assistant_reply(name):
    assert get_template(name).render([user(Q1), assistant(A1), user(Q2)]) == MULTI[name]


@pytest.mark.parametrize("name", ALL)
def test_custom_system_message_argument(name):
    assert get_template(name).render([user(Q1)], system_message="Be brief.") == CUSTOM[name]


@pytest.mark.parametrize("name", ALL)
def test_leading_system_message_overrides(name):
    t = get_template(name)
    assert t.render([system("Be brief."), user(Q1)]) == CUSTOM[name]
    # The message in the conversation wins over the argument.
    assert t.render([system("Be brief."), user(Q1)], system_message="ignored") == CUSTOM[name]


def test_without_generation_prompt_ends_with_the_separator():
    t = get_template("internvl2_5")
    assert t.render([user(Q1), assistant(A1)], add_generation_prompt=False) == (
        f"<|im_start|>system\n{V25_SYSTEM}<|im_end|>\n<|im_start|>user\n{Q1}<|im_end|>\n"
        f"<|im_start|>assistant\n{A1}<|im_end|>\n")
    assert get_template("phi3-chat").render([user(Q1)], add_generation_prompt=False) == (
        f"<|system|>\n{V2_SYSTEM}<|end|><|user|>\n{Q1}<|end|>")


def test_empty_system_message_keeps_the_system_block():
    # InternVL always renders the system template, even around an empty message.
    assert get_template("internlm2-chat").render([user("Hi")], system_message="") == (
        "<|im_start|>system\n<|im_end|><|im_start|>user\nHi<|im_end|><|im_start|>assistant\n")
    assert get_template("internvl2_5").render([system(""), user("Hi")]) == (
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_empty_content_renders_role_only_as_internvl_does():
    # get_prompt() treats a falsy message as the open slot: role, no content, no separator.
    assert get_template("internlm2-chat").render([user(""), assistant(A1), user(Q2)], system_message="S") == (
        "<|im_start|>system\nS<|im_end|><|im_start|>user\n<|im_start|>assistant\n"
        f"{A1}<|im_end|><|im_start|>user\n{Q2}<|im_end|><|im_start|>assistant\n")


def test_braces_in_content_and_system_are_kept_verbatim():
    t = get_template("internvl2_5")
    out = t.render([user("{x} {system_message}")], system_message="{y}")
    assert out == ("<|im_start|>system\n{y}<|im_end|>\n<|im_start|>user\n{x} {system_message}<|im_end|>\n"
                   "<|im_start|>assistant\n")


# --- an independent re-implementation of InternVL's MPT separator style --------------------------------------


class _MptConversation:
    """Mirrors the behaviour of InternVL's Conversation with sep_style MPT: turns are appended as
    (role string, message or None) and rendered by get_prompt()."""

    def __init__(self, system_template: str, system_message: str, roles: tuple[str, str], sep: str):
        self.system_template, self.system_message, self.roles, self.sep = system_template, system_message, roles, sep
        self.messages: list[tuple[str, str | None]] = []

    def append_message(self, role: str, message: str | None) -> None:
        self.messages.append((role, message))

    def get_prompt(self) -> str:
        out = self.system_template.format(system_message=self.system_message) + self.sep
        for role, message in self.messages:
            out += role + message + self.sep if message else role
        return out


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("turns", [
    [Q1],
    [Q1, A1, Q2],
    ["Hello", "Hi there.\nHow can I help?", "Two images:\n<image>\n<image>", "They differ.", "Why?"],
])
@pytest.mark.parametrize("system_message", [None, "You are a captioner.", "多行\n系统提示"])
def test_matches_reference_mpt_style(name, turns, system_message):
    system_template, default, roles, sep, _ = FACTS[name]  # the facts pinned above, not the module's fields
    conv = _MptConversation(system_template, default if system_message is None else system_message, roles, sep)
    messages = []
    for i, text in enumerate(turns):
        conv.append_message(roles[i % 2], text)
        messages.append(user(text) if i % 2 == 0 else assistant(text))
    conv.append_message(roles[1], None)
    assert get_template(name).render(messages, system_message=system_message) == conv.get_prompt()


def test_agrees_with_the_tiny_models_chat_template():
    """The tiny test model's Jinja template mimics internvl2_5; both must give the same prompt."""
    jinja2 = pytest.importorskip("jinja2")
    from batchvl.tools.tiny import CHAT_TEMPLATE

    env = jinja2.Environment()
    for messages in ([user(Q1)], [user(Q1), assistant(A1), user(Q2)], [system("Be brief."), user(Q1)]):
        expected = env.from_string(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True)
        assert get_template("internvl2_5").render(messages) == expected


# --- errors and lookups ---------------------------------------------------------------------------------------


def test_unknown_template_lists_known_names():
    with pytest.raises(KeyError) as err:
        get_template("llama-2")
    message = str(err.value)
    assert "llama-2" in message
    for name in ALL + COLON:
        assert name in message


@pytest.mark.parametrize("messages, add_generation_prompt", [
    ([], True),                                   # nothing to answer
    ([assistant(A1)], True),                      # starts with the assistant
    ([user(Q1), user(Q2)], True),                 # two user turns in a row
    ([user(Q1), assistant(A1)], True),            # generation after an assistant turn
    ([user(Q1), system("late"), user(Q2)], True),  # system message not first
    ([{"role": "tool", "content": "x"}], True),   # unknown role
    ([{"role": "user"}], True),                   # no content
])
def test_bad_conversations_raise(messages, add_generation_prompt):
    with pytest.raises(ValueError):
        get_template("internlm2-chat").render(messages, add_generation_prompt=add_generation_prompt)


def test_non_string_content_raises():
    with pytest.raises(TypeError):
        get_template("internlm2-chat").render([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])


def test_template_is_frozen_and_checked():
    t = get_template("Hermes-2")
    with pytest.raises(AttributeError):
        t.sep = "</s>"  # type: ignore[misc]
    with pytest.raises(ValueError):
        ConversationTemplate("bad", "no field", "", ("u", "a"), "<|im_end|>", ("<|im_end|>",))
    with pytest.raises(ValueError):
        ConversationTemplate("bad", "{system_message}", "", ("u", "a"), "<|im_end|>\n", ("<|endoftext|>",))


@pytest.mark.parametrize("name, expected", [("internlm2-chat", V2_SYSTEM), ("Hermes-2", V2_SYSTEM),
                                            ("phi3-chat", V2_SYSTEM), ("internvl2_5", V25_SYSTEM)])
def test_default_system_message_from_template(name, expected):
    assert default_system_message(name, {}) == expected
    assert default_system_message(name, {"template": name, "architectures": ["InternVLChatModel"]}) == expected


def test_default_system_message_from_config():
    assert default_system_message("internlm2-chat", {"system_message": "Custom."}) == "Custom."
    assert default_system_message("internvl2_5", {"system_message": ""}) == ""  # present, so used
    assert default_system_message("internvl2_5", {"system_message": None}) == V25_SYSTEM
    with pytest.raises(KeyError):
        default_system_message("no-such-template", {})


# --- InternVL3.5 (Qwen3) ----------------------------------------------------------------------------------------
# Sources, all in OpenGVLab/InternVL (read for the facts, at the commits the code index holds):
# - internvl_chat_gpt_oss/shell/internvl3_5_qwen3/internvl3_5_{1b,2b,4b,8b,14b,38b}_sft.sh fine-tune the Qwen3-based
#   InternVL3.5 with `--conv_style "internvl2_5"`: the dense InternVL3.5 models keep InternVL 2.5/3's template, so
#   an OpenGVLab-layout checkpoint names `template: internvl2_5`. (No released InternVL3_5-*/config.json could be
#   read here to confirm the key itself.)
# - internvl_chat_gpt_oss/internvl/model/internvl_chat/modeling_internvl_chat.py, InternVL3.5's InternVLChatModel:
#   `self.system_message = get_conv_template(self.template).system_message`, the template's own (V25_SYSTEM), and
#   chat() stops at `template.sep.strip()`: <|im_end|>.
# - internvl_chat_gpt_oss/internvl/model/internvl_chat/conversation.py: internvl2_5 as in internvl_chat's; the one
#   new template, internvl3_5_gpt_oss (Harmony: <|start|>system<|message|>, sep <|end|>, sep2 <|return|>), is the
#   GPT-OSS variant's, which is a mixture-of-experts model and refused (tests/test_models.py).
# - The thinking mode's R1 system prompt (InternVL3.5 quick start, ErfeiCui/InternVL-doc
#   docs/en/internvl3.5/quick_start.md: `model.system_message = R1_SYSTEM_PROMPT`) is opt-in, not a default.

def test_internvl3_5_opengvlab_checkpoint_renders_internvl2_5_with_its_system_message(tmp_path):
    import json

    from batchvl.models.checkpoint import CheckpointInfo
    from batchvl.tools.tiny import make_tiny_model

    make_tiny_model(tmp_path / "m", layout="opengvlab", llm="qwen3")
    ck = CheckpointInfo.read(tmp_path / "m")
    assert ck.text_config["architectures"] == ["Qwen3ForCausalLM"] and ck.template_name == "internvl2_5"
    assert json.loads((tmp_path / "m" / "tokenizer_config.json").read_text()).get("chat_template") is None
    template = get_template(ck.template_name)
    system_message = default_system_message(ck.template_name, ck.config)
    assert system_message == V25_SYSTEM
    prompt = template.render([user("Frame1: <image>\nFrame2: <image>\nWhat happens?")], system_message=system_message)
    assert prompt == (f"<|im_start|>system\n{V25_SYSTEM}<|im_end|>\n<|im_start|>user\nFrame1: <image>\n"
                      "Frame2: <image>\nWhat happens?<|im_end|>\n<|im_start|>assistant\n")
    assert template.stop_strings == ("<|im_end|>",)


# --- InternVL2-40B and InternVL2-Llama3-76B -----------------------------------------------------------------------
# Sources (OpenGVLab/InternVL, read for the facts): internvl_chat/shell/internvl2.0/2nd_finetune/
# internvl2_40b_hermes2_yi_34b_dynamic_res_2nd_finetune_full.sh fine-tunes InternVL2-40B with --conv_style "Hermes-2",
# and internvl2_76b_hermes2_llama3_70b_dynamic_res_2nd_finetune_full.sh fine-tunes InternVL2-Llama3-76B with
# --conv_style "internlm2-chat" (not Hermes-2 and not internvl2_5), both with dynamic_image_size True and ps_version
# v2; the fine-tune writes conv_style into config.json as `template`. internvl_chat/internvl/conversation.py: Hermes-2
# and internlm2-chat are the same ChatML text with InternVL 2.0's system message ("completely equivalent during
# inference"), sep <|im_end|>, and Hermes-2 adds stop_str <|endoftext|>; modeling_internvl_chat.py's chat() stops at
# `template.sep.strip()`, <|im_end|>. (Yi-34B's tokenizer holds <|im_end|> as one token, id 7 in conversation.py's
# old stop_token_ids comment; Hermes-2-Theta-Llama-3's ChatML tokenizer holds it too. Neither tokenizer could be read
# here, so the ids themselves are not checked.)

@pytest.mark.parametrize("template", ["Hermes-2", "internlm2-chat"], ids=["internvl2-40b", "internvl2-llama3-76b"])
def test_internvl2_40b_and_76b_render_chatml_with_internvl2s_message_and_stop_at_im_end(template):
    config = {"template": template, "dynamic_image_size": True, "use_thumbnail": True, "ps_version": "v2",
              "llm_config": {"architectures": ["LlamaForCausalLM"]}}
    system_message = default_system_message(template, config)
    assert system_message == V2_SYSTEM
    assert get_template(template).render([user(Q1)], system_message=system_message) == (
        f"<|im_start|>system\n{V2_SYSTEM}<|im_end|><|im_start|>user\n{Q1}<|im_end|><|im_start|>assistant\n")
    assert get_template(template).eos_token == "<|im_end|>"
