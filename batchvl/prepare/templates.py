"""InternVL's own conversation templates, for checkpoints whose tokenizer has no chat template.

OpenGVLab-layout checkpoints (`architectures: ["InternVLChatModel"]`) name a conversation template in
config.json (`template`). Their remote code builds each prompt with that template: it sets the template's
system message to the model's, appends the user turn and an empty assistant turn, and renders. The InternVL
1.5+ templates use InternVL's "MPT" separator style, which renders as

    system_template(system message) + sep
    + for each turn: role + content + sep   (a turn with empty content gives its role alone, no sep)
    + the assistant role, when a reply is to be generated

InternVL 1's `internvl_zh` (InternVL-Chat-V1-1) and FastChat's `vicuna_v1.1` use the "colon, two separators"
style (ADD_COLON_TWO; internvl_zh's INTERNVL_ZH renders the same): a template with `sep2` renders as

    system message + sep
    + for each turn: role + ": " + content + (sep after a user turn, sep2 after an assistant turn)
      (a turn with empty content gives role + ":" alone)
    + the assistant role + ":", when a reply is to be generated

Generation stops at the end-of-turn separator stripped (`sep.strip()`, or `sep2.strip()` with two
separators): the token `chat()` passes as `eos_token_id`; a template may name further stop strings.

Source: OpenGVLab/InternVL, internvl_chat/internvl/conversation.py (the same file ships in each hub
checkpoint as conversation.py) and internvl_chat/internvl/model/internvl_chat/modeling_internvl_chat.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "INTERNVL2_SYSTEM_MESSAGE",
    "INTERNVL2_5_SYSTEM_MESSAGE",
    "INTERNVL_V1_2_SYSTEM_MESSAGE",
    "VICUNA_SYSTEM_MESSAGE",
    "ConversationTemplate",
    "TEMPLATES",
    "get_template",
    "default_system_message",
    "is_internvl1",
]

# The system message of the InternVL 1.5 / 2.0 era templates (internlm2-chat, Hermes-2, phi3-chat).
# Note the ASCII ", " after "InternVL"; the rest of the punctuation is full-width.
INTERNVL2_SYSTEM_MESSAGE = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
)
# The system message of the internvl2_5 template (InternVL 2.5 and InternVL 3).
INTERNVL2_5_SYSTEM_MESSAGE = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)

# Hermes-2's system message when InternVL-Chat-V1-2 / -V1-2-Plus were trained and released (OpenGVLab/InternVL at
# "Release InternVL-Chat-V1.2", 88a146c, internvl_chat/internvl/conversation.py; the fine-tune script there renders
# every sample with the template's own message; LMDeploy's `internvl-zh-hermes2` template for V1-2 carries it too).
# InternVL 2.0 changed Hermes-2's message to INTERNVL2_SYSTEM_MESSAGE, for InternVL2-40B.
INTERNVL_V1_2_SYSTEM_MESSAGE = "Answer the questions."
VICUNA_SYSTEM_MESSAGE = ("A chat between a curious user and an artificial intelligence assistant. "
                         "The assistant gives helpful, detailed, and polite answers to the user's questions.")

_SYSTEM_FIELD = "{system_message}"
_ROLES = ("user", "assistant")


@dataclass(frozen=True)
class ConversationTemplate:
    """One InternVL conversation template (MPT separator style)."""

    name: str
    system_template: str
    default_system_message: str
    roles: tuple[str, str]
    sep: str
    stop_strings: tuple[str, ...]
    sep2: str | None = None  # set: the colon style, sep after user turns, sep2 after assistant turns

    def __post_init__(self) -> None:
        if self.system_template.count(_SYSTEM_FIELD) != 1:
            raise ValueError(f"template {self.name!r}: system_template must contain {_SYSTEM_FIELD} exactly once")
        if len(self.roles) != 2:
            raise ValueError(f"template {self.name!r}: roles must be (user, assistant)")
        if not self.eos_token:
            raise ValueError(f"template {self.name!r}: {'sep2' if self.sep2 is not None else 'sep'} "
                             "must not be blank")
        if not self.stop_strings or self.stop_strings[0] != self.eos_token:
            raise ValueError(f"template {self.name!r}: stop_strings must start with the end-of-turn separator "
                             "stripped")

    @property
    def eos_token(self) -> str:
        """The token InternVL's chat() stops at: the end-of-turn separator (sep, or sep2 in the colon style)
        without surrounding whitespace."""
        return (self.sep if self.sep2 is None else self.sep2).strip()

    def render(self, messages: list[dict], system_message: str | None = None,
               add_generation_prompt: bool = True) -> str:
        """The prompt InternVL's get_prompt() gives for these turns.

        `messages`: `{'role': 'system'|'user'|'assistant', 'content': str}` dicts. After an optional leading
        system message, turns alternate user, assistant, ... starting with the user; with
        `add_generation_prompt` they must end with a user turn, and the prompt ends with the assistant role.
        The system prompt is the leading system message if there is one, else `system_message` if given,
        else the template's default. An empty content renders as its role alone, as InternVL does.
        """
        system, turns = self._split_system(messages)
        if system is None:
            system = self.default_system_message if system_message is None else system_message
        expected = [_ROLES[i % 2] for i in range(len(turns) + (1 if add_generation_prompt else 0))]
        got = [role for role, _ in turns] + (["assistant"] if add_generation_prompt else [])
        if got != expected:
            ending = " and end with a user turn (add_generation_prompt)" if add_generation_prompt else ""
            raise ValueError(f"template {self.name!r}: turns must alternate user, assistant, ... from the user"
                             f"{ending}; got roles {[role for role, _ in turns]}")

        colon = ": " if self.sep2 is not None else ""
        seps = (self.sep, self.sep if self.sep2 is None else self.sep2)  # after a user / an assistant turn
        parts = [self.system_template.replace(_SYSTEM_FIELD, system), self.sep]
        for role, content in turns:
            i = _ROLES.index(role)
            parts.append(self.roles[i] + (colon if content else colon.rstrip()))
            if content:
                parts.append(content)
                parts.append(seps[i])
        if add_generation_prompt:
            parts.append(self.roles[1] + colon.rstrip())
        return "".join(parts)

    def _split_system(self, messages: list[dict]) -> tuple[str | None, list[tuple[str, str]]]:
        system: str | None = None
        turns: list[tuple[str, str]] = []
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
                raise ValueError(f"template {self.name!r}: message {i} must be a dict with 'role' and 'content'")
            role, content = message["role"], message["content"]
            if not isinstance(content, str):
                raise TypeError(f"template {self.name!r}: message {i} content must be a string, "
                                f"not {type(content).__name__}")
            if role == "system":
                if i != 0:
                    raise ValueError(f"template {self.name!r}: only the first message may be a system message")
                system = content
            elif role in _ROLES:
                turns.append((role, content))
            else:
                raise ValueError(f"template {self.name!r}: message {i} has unknown role {role!r}")
        return system, turns


def _chatml(name: str, system_message: str, sep: str, extra_stops: tuple[str, ...] = ()) -> ConversationTemplate:
    return ConversationTemplate(
        name=name,
        system_template="<|im_start|>system\n" + _SYSTEM_FIELD,
        default_system_message=system_message,
        roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
        sep=sep,
        stop_strings=(sep.strip(), *extra_stops),
    )


TEMPLATES: dict[str, ConversationTemplate] = {
    t.name: t
    for t in (
        # InternLM2-based InternVL 1.5 / 2.0 models. No newline between turns.
        _chatml("internlm2-chat", INTERNVL2_SYSTEM_MESSAGE, "<|im_end|>"),
        # Same text as internlm2-chat (InternVL notes they differ only in training-time BOS handling); the
        # template also names <|endoftext|> as a stop string.
        _chatml("Hermes-2", INTERNVL2_SYSTEM_MESSAGE, "<|im_end|>", ("<|endoftext|>",)),
        ConversationTemplate(
            name="phi3-chat",
            system_template="<|system|>\n" + _SYSTEM_FIELD,
            default_system_message=INTERNVL2_SYSTEM_MESSAGE,
            roles=("<|user|>\n", "<|assistant|>\n"),
            sep="<|end|>",
            stop_strings=("<|end|>",),
        ),
        # InternVL 2.5 and 3: ChatML with a newline after each <|im_end|>.
        _chatml("internvl2_5", INTERNVL2_5_SYSTEM_MESSAGE, "<|im_end|>\n"),
        # FastChat's Vicuna v1.1 (in InternVL's conversation.py up to InternVL 1.5): Llama / Vicuna models.
        ConversationTemplate(name="vicuna_v1.1", system_template=_SYSTEM_FIELD,
                             default_system_message=VICUNA_SYSTEM_MESSAGE, roles=("USER", "ASSISTANT"), sep=" ",
                             sep2="</s>", stop_strings=("</s>",)),
        # InternVL-Chat-V1-1's own (LLaMA2-13B): no system message, so every prompt starts with the space.
        ConversationTemplate(name="internvl_zh", system_template=_SYSTEM_FIELD, default_system_message="",
                             roles=("<human>", "<bot>"), sep=" ", sep2="</s>", stop_strings=("</s>",)),
    )
}


def get_template(name: str) -> ConversationTemplate:
    """The template a checkpoint's config names; KeyError naming the known ones otherwise."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise KeyError(f"unknown InternVL conversation template {name!r}; known: {', '.join(sorted(TEMPLATES))}") \
            from None


def default_system_message(name: str, config: Mapping[str, Any] | None = None) -> str:
    """The system message InternVLChatModel uses for a checkpoint whose config names template `name`.

    InternVL's modeling code takes `system_message` from the config when the key is there, else the
    template's own; the template default is what ties the message to the model generation (InternVL 2.0's
    templates versus internvl2_5).
    """
    template = get_template(name)
    if config is not None:
        value = config.get("system_message")
        if "system_message" in config and isinstance(value, str):
            return value
        if name == "Hermes-2" and is_internvl1(config):
            return INTERNVL_V1_2_SYSTEM_MESSAGE
    return template.default_system_message


def is_internvl1(config: Mapping[str, Any]) -> bool:
    """An InternVL 1 (InternVL-Chat-V1-1 / V1-2 / V1-2-Plus) OpenGVLab config: dynamic tiling off, which is
    InternVLChatConfig's default when the key is absent. InternVL 1.5 and later all set it."""
    return "llm_config" in config and not config.get("dynamic_image_size", False)
