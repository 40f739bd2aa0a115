"""Chat-message rows, as LMDeploy's InternVL examples write them (and OpenAI's chat format).

A row's messages column holds a list of `{role, content}`. `content` is a string, or a list of parts:
`{type: text, text}`, `{type: image_url, image_url: {url, max_dynamic_patch}}` (or `image_url: "url"`),
and `{type: image, image: <reference>}` for any reference batchvl reads (bytes, an image struct, ...).
Within a message, `<image>` placeholders (or LMDeploy's `<IMAGE_TOKEN>`) in the text say where its images
go, one each, in order; with none, the message's images come first, each as `<image>\\n`. System and
assistant turns are kept, so a multi-turn conversation (with images in earlier turns) is one prompt.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from batchvl.config.checks import LIMITS
from batchvl.config.spec import shown
from batchvl.errors import RowError
from batchvl.prepare.plan import MediaRef
from batchvl.prepare.prompt import place_images

ROLES = ("system", "user", "assistant")


def flatten_messages(cell: Any, default_max_tiles: int, column: str, shield: Callable[[str], str] = str
                     ) -> tuple[list[dict[str, str]], list[MediaRef]]:
    """Messages with string contents (placeholders in place, text through `shield`: row text) and the images
    they reference, in order."""
    if isinstance(cell, str):
        try:
            cell = json.loads(cell)
        except json.JSONDecodeError as e:
            raise RowError(f"messages: {column!r} holds a string that is not JSON: {e}") from None
    if not isinstance(cell, list) or not cell:
        raise RowError(f"messages: {column!r} must be a non-empty list of {{role, content}}, got "
                       f"{type(cell).__name__}")
    out: list[dict[str, str]] = []
    media: list[MediaRef] = []
    for i, message in enumerate(cell):
        if not isinstance(message, dict) or "role" not in message:
            raise RowError(f"messages: message {i} must be a mapping with a role and content")
        role = message["role"]
        if role not in ROLES:
            raise RowError(f"messages: message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        text, images = _content(message.get("content"), i, default_max_tiles)
        if images and role != "user":
            raise RowError(f"messages: message {i} ({role}) has images; only user turns may")
        try:
            text = place_images(shield(text), len(images))
        except RowError as e:
            raise RowError(f"messages: message {i}: {e}") from None
        out.append({"role": role, "content": text})
        media.extend(images)
    if out[-1]["role"] != "user":
        raise RowError("messages: the last message must be the user's (the model answers it)")
    return out, media


def _content(content: Any, index: int, default_max_tiles: int) -> tuple[str, list[MediaRef]]:
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise RowError(f"messages: message {index} content must be a string or a list of parts")
    texts: list[str] = []
    images: list[MediaRef] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise RowError(f"messages: message {index} has a text part without a string `text`")
            texts.append(part["text"])
        elif kind == "image_url":
            spec = part.get("image_url")
            spec = {"url": spec} if isinstance(spec, str) else spec
            if not isinstance(spec, dict) or not spec.get("url"):
                raise RowError(f"messages: message {index} has an image_url part without a url")
            images.append(MediaRef("image", spec["url"], _max_tiles(spec, index, default_max_tiles)))
        elif kind == "image":
            if part.get("image") is None:
                raise RowError(f"messages: message {index} has an image part without `image`")
            images.append(MediaRef("image", part["image"], _max_tiles(part, index, default_max_tiles)))
        else:
            raise RowError(f"messages: message {index} has a part of unknown type {kind!r} "
                           "(expected text, image_url or image)")
    return "".join(texts), images  # LMDeploy joins a message's text parts with nothing between them


def _max_tiles(spec: dict, index: int, default: int) -> int:
    value = spec.get("max_dynamic_patch")
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RowError(f"messages: message {index}: max_dynamic_patch must be an integer >= 1, got {shown(value)}")
    most = LIMITS["media.max_dynamic_patch"]
    if value > most:
        raise RowError(f"messages: message {index}: max_dynamic_patch is {value}, more than {most}, the most a "
                       "row may ask for")
    return value
