"""Prompt building, as InternVL does it.

1. Placeholders: `<image>` marks where an image goes; LMDeploy's `<IMAGE_TOKEN>` spelling is accepted too.
   A prompt with images but no placeholder gets `<image>\\n` prepended once per image.
2. The chat template (the checkpoint's own for `auto`, none, or a .jinja file) is applied to the user turn.
3. Each placeholder, in order, becomes `<img>` + `<IMG_CONTEXT>` x (tokens per tile x tiles) + `</img>`.
4. The result is tokenized; special tokens are added unless the template already wrote the BOS token.

Row text never produces the model's special tokens. The strings of the image tokens (`<img>`, `</img>`,
`<IMG_CONTEXT>`) and, when a chat template is applied, of its control tokens (the special tokens it writes,
such as `<|im_start|>` and `<|im_end|>`) and of the tokenizer's BOS, EOS, pad and unknown tokens, found in a
row's prompt, in the values a `{column}` field brings or in its messages, are `shield`ed: each becomes a
marker that passes through the chat template unchanged and is tokenized as plain text (the tokenizer's
`split_special_tokens`), on its own, like the text between special tokens always is. The job's own `prompt`
text is not row text and keeps its meaning. Other special tokens (InternVL's grounding `<ref>`, `<box>`,
`<quad>`) stay the model's vocabulary for users to write.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
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
# A marker in shielded text: _ESC, then the protected string's code. _ESC itself is protected, so a row's own
# U+E000 is shielded too and every _ESC in shielded text starts a marker.
_ESC = "\ue000"
_CODE0 = 0xE100
_MARKER = re.compile("\ue000(.)", re.DOTALL)
_PIECES = re.compile("\ue000.|" + re.escape(IMAGE_PLACEHOLDER), re.DOTALL)  # where row text is cut in the prompt
COUNT_CHUNK = 1 << 14  # characters tokenized at once when bounding a long text's tokens
COUNT_SLACK = 4  # tokens a piece counted alone may have beyond its share of the whole prompt's


def prompt_fields(template: str) -> list[str]:
    """The columns a job-level prompt's `{column}` fields name, in order, each once (`validate` checks them)."""
    return list(dict.fromkeys(_FIELD.findall(template)))


def fill_fields(template: str, row: dict[str, Any], shield: Callable[[str], str] = str) -> str:
    """Fill `{column}` fields of a job-level prompt from the row, each value through `shield` (row text).
    Other braces are left alone."""

    def value(match: re.Match) -> str:
        name = match.group(1)
        if name not in row:
            raise RowError(f"prompt: the row has no column {name!r} for the field {{{name}}}")
        return shield(str(row[name]))

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
        self._image_ids = self._single_ids((IMG_START, IMG_END, IMG_CONTEXT))
        # Each protected string's plain-text ids, or None where the tokenizer cannot split it (its rows are
        # refused). Tokenized here, once: split_special_tokens is a setting of the shared tokenizer, which
        # the preparation threads must never see switched.
        protected = self._protected()
        self._special_ids = {ids[0] for ids in (self._ids(t) for t in protected) if len(ids) == 1}
        self._plain = {text: self._plain_ids(text) for text in (_ESC, *protected)}
        self._codes = {text: _ESC + chr(_CODE0 + i) for i, text in enumerate(self._plain)}
        self._by_code = {chr(_CODE0 + i): text for i, text in enumerate(self._plain)}
        self._find = re.compile("|".join(re.escape(t) for t in sorted(self._plain, key=len, reverse=True)))

    # ---- row text and the model's special tokens --------------------------------------------------------

    def shield(self, text: str) -> str:
        """Row text with each protected special-token string in it replaced by a marker that `encode_messages`
        tokenizes as plain text (see the module docstring)."""
        return self._find.sub(self._mark, text)

    def _mark(self, match: re.Match) -> str:
        text = match.group(0)
        if self._plain[text] is None:
            raise RowError(f"prompt: the text holds {text!r}, one of the model's special tokens, and this "
                           "tokenizer cannot encode it as plain text")
        return self._codes[text]

    def _protected(self) -> list[str]:
        """The strings row text must not turn into tokens: the image tokens, and with a chat template the
        special tokens it writes and the tokenizer's BOS, EOS, pad and unknown tokens."""
        found = [IMG_START, IMG_END, IMG_CONTEXT]
        if self.template is not None:
            tok = self.tokenizer
            found += [getattr(tok, f"{name}_token", None) for name in ("bos", "eos", "pad", "unk")]
            if isinstance(self.template, ConversationTemplate):
                found += self.template.stop_strings
            probe = self._probe()
            found += [t for t in _special_tokens(tok) if t in probe]
        return sorted({t for t in found if isinstance(t, str) and t and t != IMAGE_PLACEHOLDER})

    def _probe(self) -> str:
        """The chat template's own text: a conversation whose contents hold no special token, rendered."""
        turns = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
                 {"role": "user", "content": "Bye."}]
        out = []
        for messages in ([{"role": "system", "content": "Be brief."}, *turns], turns, turns[:1]):
            try:
                out.append(self.render_messages(messages))
            except Exception:  # a template that refuses system turns, say: the others still show its tokens
                pass
        return "".join(out)

    def _plain_ids(self, text: str) -> list[int] | None:
        """`text` tokenized as plain text, or None when the tokenizer cannot (then it holds a special id)."""
        try:
            ids = list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
        except TypeError:  # a tokenizer without the option
            return None
        finally:
            try:  # the fast tokenizer keeps the last call's setting: put it back before any thread uses it
                self.tokenizer("", add_special_tokens=False)
            except Exception:
                pass
        return ids if ids and not self._special_ids.intersection(ids) else None

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _single_ids(self, texts: Iterable[str]) -> tuple[int, ...] | None:
        """The token id of each text, when each is one token; None otherwise (a stand-in tokenizer)."""
        ids = [self._ids(t) for t in texts]
        return tuple(i[0] for i in ids) if all(len(i) == 1 for i in ids) else None

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

    def expand(self, rendered: str, tiles_per_image: list[int], context: int | None = None) -> str:
        """Replace each `<image>`, in order, with its image's `<img><IMG_CONTEXT>...</img>` run (`context`: that
        many context tokens in each run, not the image's own count)."""
        parts = rendered.split(IMAGE_PLACEHOLDER)
        if len(parts) - 1 != len(tiles_per_image):
            raise RowError(f"prompt: the rendered prompt has {len(parts) - 1} {IMAGE_PLACEHOLDER} placeholder(s) "
                           f"for {len(tiles_per_image)} image(s); does the chat template add its own?")
        out = [parts[0]]
        for tiles, tail in zip(tiles_per_image, parts[1:], strict=True):
            out.append(IMG_START + IMG_CONTEXT * (self.tokens_per_tile * tiles if context is None else context)
                       + IMG_END)
            out.append(tail)
        return "".join(out)

    def readable(self, messages: list[dict[str, str]], tiles_per_image: list[int]) -> str:
        """The prompt `encode_messages` tokenizes, for people to read (batchvl preview): each image's context
        tokens written as their count (`<img><IMG_CONTEXT>×256</img>`), shielded row text as it was written."""
        parts = self.render_messages(messages).split(IMAGE_PLACEHOLDER)
        if len(parts) - 1 != len(tiles_per_image):
            raise RowError(f"prompt: {len(parts) - 1} {IMAGE_PLACEHOLDER} placeholder(s) for {len(tiles_per_image)} "
                           "image(s)")
        runs = [f"{IMG_START}{IMG_CONTEXT}×{self.tokens_per_tile * tiles}{IMG_END}" for tiles in tiles_per_image]
        full = parts[0] + "".join(run + tail for run, tail in zip(runs, parts[1:], strict=True))
        return _MARKER.sub(lambda m: self._by_code.get(m.group(1), m.group(0)), full)

    def encode(self, text: str, tiles_per_image: list[int]) -> list[int]:
        """Token ids for a user prompt whose placeholders are already in place."""
        return self.encode_messages([{"role": "user", "content": text}], tiles_per_image)

    def encode_messages(self, messages: list[dict[str, str]], tiles_per_image: list[int]) -> list[int]:
        """Token ids for a conversation whose placeholders are in place, images in order across turns."""
        try:
            rendered = self.render_messages(messages)
        except (ValueError, TypeError, jinja2.TemplateError) as e:  # e.g. turns that do not alternate
            raise RowError(f"messages: the chat template refused them: {e}") from None
        # Each image's run is tokenized with one context token and widened after: the context token is a special
        # token, at which the tokenizer cuts the text, so the ids are those of the full run, and tokenizing 1,792
        # context tokens took 2.4 ms a row of the engine's process (a 7-tile image; 0.05 ms with one).
        narrow = self._image_ids is not None and bool(tiles_per_image)
        ids = self._tokenize(self.expand(rendered, tiles_per_image, context=1 if narrow else None))
        if narrow:
            ids = self._widen(ids, tiles_per_image)
        if ids is None:  # not one context token per image: the row's own text holds some (the check says so)
            ids = self._tokenize(self.expand(rendered, tiles_per_image))
        self._check_image_tokens(ids, tiles_per_image)
        return ids

    def _tokenize(self, full: str) -> list[int]:
        add_special = not (self._bos and full.startswith(self._bos))
        if _ESC not in full:
            return self.tokenizer(full, add_special_tokens=add_special)["input_ids"]
        return self._encode_shielded(full, add_special)

    def _widen(self, ids: list[int], tiles_per_image: list[int]) -> list[int] | None:
        """`ids` with each image's one context token repeated to its count, or None unless there is exactly one
        per image."""
        context = self._image_ids[2]
        at = [i for i, t in enumerate(ids) if t == context]
        if len(at) != len(tiles_per_image):
            return None
        out, start = [], 0
        for i, tiles in zip(at, tiles_per_image, strict=True):
            out += ids[start:i]
            out += [context] * (self.tokens_per_tile * tiles)
            start = i + 1
        return out + ids[start:]

    def _encode_shielded(self, full: str, add_special: bool) -> list[int]:
        """Token ids of a prompt holding markers: the text between them tokenized as usual, each marker's
        string as plain text. The tokenizer cuts its text at special tokens the same way."""
        parts = _MARKER.split(full)  # text, code, text, code, ..., text
        ids = list(self.tokenizer(parts[0], add_special_tokens=add_special)["input_ids"])
        for code, text in zip(parts[1::2], parts[2::2], strict=True):
            protected = self._by_code.get(code)
            if protected is None:  # not a marker: U+E000 in the job's own text
                text = _ESC + code + text
            else:
                ids += self._plain[protected]
            if text:
                ids += self._ids(text)
        return ids

    def _check_image_tokens(self, ids: list[int], tiles_per_image: list[int]) -> None:
        """Refuse a prompt whose image tokens are not exactly those of its placeholders: the engine places
        each tile's features at the context tokens in order, and any other count would fail the whole batch."""
        if self._image_ids is None:
            return
        start, end, context = self._image_ids
        want = self.tokens_per_tile * sum(tiles_per_image)
        got = (ids.count(start), ids.count(end), ids.count(context))
        if got != (len(tiles_per_image), len(tiles_per_image), want):
            raise RowError(f"prompt: holds {got[0]} {IMG_START}, {got[1]} {IMG_END} and {got[2]} {IMG_CONTEXT} "
                           f"tokens where its {len(tiles_per_image)} image(s) need {want} context tokens; "
                           "write image tokens only as <image> placeholders")

    def tokens_at_least(self, texts: Iterable[str], enough: int) -> int:
        """A lower bound on the tokens the row texts `texts` (contents as planned) take in the prompt, not
        counting images or the template; counting stops once it passes `enough`, so a text of any length
        costs about `enough` tokens' worth of tokenizing. Each piece between placeholders and markers is
        tokenized in chunks of COUNT_CHUNK characters, cut at a space where there is one; a chunk tokenized
        alone has at most COUNT_SLACK tokens more than its share of the whole prompt's."""
        total = 0
        for text in texts:
            for piece in _PIECES.split(text):
                for chunk in _chunks(piece, COUNT_CHUNK):
                    total += max(0, len(self._ids(chunk)) - COUNT_SLACK)
                    if total > enough:
                        return total
        return total


def _chunks(text: str, size: int) -> Iterator[str]:
    """`text` in pieces of at most `size` characters, each cut before a space where one is near the end."""
    start = 0
    while len(text) - start > size:
        cut = text.rfind(" ", start + size // 2, start + size)
        cut = cut if cut > start else start + size
        yield text[start:cut]
        start = cut
    if start < len(text):
        yield text[start:]


def _special_tokens(tokenizer: Any) -> list[str]:
    """The tokenizer's special added tokens (none for a stand-in tokenizer)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None)
    if isinstance(decoder, dict):
        return [getattr(t, "content", str(t)) for t in decoder.values() if getattr(t, "special", True)]
    return list(getattr(tokenizer, "all_special_tokens", None) or [])
