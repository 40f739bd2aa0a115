"""Prompt building, as InternVL does it.

1. Placeholders: `<image>` marks where an image goes; LMDeploy's `<IMAGE_TOKEN>` spelling is accepted too.
   A prompt with images but no placeholder gets `<image>\\n` prepended once per image.
2. The chat template (the checkpoint's own for `auto`, none, or a .jinja file) is applied to the user turn.
3. Each placeholder, in order, becomes `<img>` + `<IMG_CONTEXT>` x (tokens per tile x tiles) + `</img>`.
4. The result is tokenized; special tokens are added unless the template already wrote the BOS token.
"""

from __future__ import annotations

import re
from typing import Any

import jinja2

from batchvl.errors import RowError
from batchvl.prepare.templates import ConversationTemplate

IMAGE_PLACEHOLDER = "<image>"
LMDEPLOY_IMAGE_TOKEN = "<IMAGE_TOKEN>"
IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"

_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def fill_fields(template: str, row: dict[str, Any]) -> str:
    """Fill `{column}` fields of a job-level prompt from the row. Other braces are left alone."""

    def value(match: re.Match) -> str:
        name = match.group(1)
        if name not in row:
            raise RowError(f"prompt: the row has no column {name!r} for the field {{{name}}}")
        return str(row[name])

    return _FIELD.sub(value, template)


def place_images(text: str, n_images: int) -> str:
    """Normalise placeholders to `<image>` and check there is one per image (prepending them if none)."""
    text = text.replace(LMDEPLOY_IMAGE_TOKEN, IMAGE_PLACEHOLDER)
    found = text.count(IMAGE_PLACEHOLDER)
    if found == 0 and n_images:
        return (IMAGE_PLACEHOLDER + "\n") * n_images + text
    if found != n_images:
        raise RowError(f"prompt: has {found} {IMAGE_PLACEHOLDER} placeholder(s) but the row has {n_images} image(s)")
    return text


class PromptBuilder:
    """Renders a user turn with the chat template and expands image placeholders into context tokens."""

    def __init__(self, tokenizer: Any, template: str | ConversationTemplate | None, tokens_per_tile: int,
                 system_message: str | None = None):
        """`template`: Jinja source to apply, one of InternVL's named conversation templates, or None to use
        the prompt raw. `system_message` applies to a conversation template (the checkpoint's)."""
        self.tokenizer = tokenizer
        self.template = template
        self.system_message = system_message
        self.tokens_per_tile = tokens_per_tile
        bos = getattr(tokenizer, "bos_token", None)
        self._bos = bos if isinstance(bos, str) and bos else None

    def render(self, text: str) -> str:
        """The user turn through the chat template, ending with the assistant's generation prompt."""
        return self.render_messages([{"role": "user", "content": text}])

    def render_messages(self, messages: list[dict[str, str]]) -> str:
        """A conversation (string contents) through the chat template, ending with the generation prompt.
        Without a template the turns' contents are concatenated."""
        if self.template is None:
            return "".join(m["content"] for m in messages)
        if isinstance(self.template, ConversationTemplate):
            return self.template.render(messages, system_message=self.system_message)
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=True)

    def expand(self, rendered: str, tiles_per_image: list[int]) -> str:
        """Replace each `<image>`, in order, with its image's `<img><IMG_CONTEXT>...</img>` run."""
        parts = rendered.split(IMAGE_PLACEHOLDER)
        if len(parts) - 1 != len(tiles_per_image):
            raise RowError(f"prompt: the rendered prompt has {len(parts) - 1} {IMAGE_PLACEHOLDER} placeholder(s) "
                           f"for {len(tiles_per_image)} image(s); does the chat template add its own?")
        out = [parts[0]]
        for tiles, tail in zip(tiles_per_image, parts[1:], strict=True):
            out.append(IMG_START + IMG_CONTEXT * (self.tokens_per_tile * tiles) + IMG_END)
            out.append(tail)
        return "".join(out)

    def encode(self, text: str, tiles_per_image: list[int]) -> list[int]:
        """Token ids for a user prompt whose placeholders are already in place."""
        return self.encode_messages([{"role": "user", "content": text}], tiles_per_image)

    def encode_messages(self, messages: list[dict[str, str]], tiles_per_image: list[int]) -> list[int]:
        """Token ids for a conversation whose placeholders are in place, images in order across turns."""
        try:
            rendered = self.render_messages(messages)
        except (ValueError, TypeError, jinja2.TemplateError) as e:  # e.g. turns that do not alternate
            raise RowError(f"messages: the chat template refused them: {e}") from None
        full = self.expand(rendered, tiles_per_image)
        add_special = not (self._bos and full.startswith(self._bos))
        return self.tokenizer(full, add_special_tokens=add_special)["input_ids"]
