"""LMDeploy-style pipeline inputs as chat messages, the form a `batchvl run` row's messages column holds: a string
is one user turn; a (prompt, image or images) pair is one user turn whose content is the text part followed by
one image part per image; a messages list is used as it is (copied, Pillow images as PNG bytes)."""

from __future__ import annotations

import os
from typing import Any

from PIL import Image

from batchvl.vl.utils import png_bytes

ImageInput = Image.Image | str | os.PathLike | bytes | dict  # what a pair's image (or list of images) may hold
Prompt = str | tuple | list  # a string, a (prompt, image(s)) pair, or a messages list


def is_single(prompts: Any) -> bool:
    """One input (a string, a pair, a conversation) rather than a list of inputs."""
    return isinstance(prompts, (str, tuple)) or _is_conversation(prompts)


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def to_messages(prompt: Prompt) -> list[dict]:
    """One input as the messages a `messages_column` cell holds. Pillow images become PNG bytes (lossless)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, tuple):
        if len(prompt) != 2 or not isinstance(prompt[0], str):
            raise TypeError("a pair input must be (prompt text, image or list of images)")
        text, images = prompt
        images = list(images) if isinstance(images, (list, tuple)) else [] if images is None else [images]
        parts = [{"type": "text", "text": text}] + [{"type": "image", "image": _reference(im)} for im in images]
        return [{"role": "user", "content": parts}]
    if _is_conversation(prompt):
        return [_message(m) for m in prompt]
    raise TypeError(f"unsupported input {type(prompt).__name__}: expected a string, a (prompt, images) pair, "
                    "a list of messages, or a list of these")


def _message(message: Any) -> Any:
    """A copy of a message (the caller's list is never changed), with Pillow images as PNG bytes."""
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        return dict(message) if isinstance(message, dict) else message  # flatten_messages reports bad ones
    parts = []
    for part in message["content"]:
        if isinstance(part, dict) and part.get("type") == "image":
            part = {**part, "image": _reference(part.get("image"))}
        elif isinstance(part, dict) and part.get("type") == "image_url" and isinstance(part.get("image_url"), dict):
            part = {**part, "image_url": {**part["image_url"], "url": _reference(part["image_url"].get("url"))}}
        parts.append(part)
    return {**message, "content": parts}


def _reference(image: ImageInput) -> Any:
    if isinstance(image, Image.Image):
        return png_bytes(image)
    if isinstance(image, os.PathLike):
        return os.fspath(image)
    return image
