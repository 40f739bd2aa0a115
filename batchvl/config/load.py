"""Reading a job file: YAML, `--set` overrides, and building the section dataclasses with type checks.

Every problem is a `JobError` whose message starts with the dotted key it is about, so the CLI can print it
on one line and exit with code 2. Relative paths are resolved against the folder of the job file.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from batchvl.config.checks import check_job
from batchvl.config.spec import Job, path_is, shown
from batchvl.config.values import Problems
from batchvl.errors import JobError


def load_job(path: str | os.PathLike, overrides: list[str] = ()) -> Job:
    """Read, override and validate a job file. Raises JobError naming the key on any problem."""
    raw = read_mapping(path)
    return job_from_mapping({} if raw is None else raw, Path(path).resolve().parent, overrides)


def read_mapping(path: str | os.PathLike) -> Any:
    """The YAML a job file holds (None for an empty file), read as load_job reads it: no anchors or aliases,
    bounded nesting. Raises JobError."""
    path = Path(path)
    if not path_is(path, "is_file"):
        raise JobError(f"job: no such file: {shown(str(path), quote=False)}")
    try:
        raw = _load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise JobError(f"job: {shown(str(path), quote=False)} is not UTF-8 text") from None
    except _Refused as e:
        raise JobError(f"job: line {e.problem_mark.line + 1}: {e.problem}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise JobError(f"job: not valid YAML{where}: {shown(str(getattr(e, 'problem', e)), quote=False)}") from None
    except ValueError as e:  # a value YAML reads but Python refuses: an integer of 5,000 digits, a 13th month
        raise JobError(f"job: not valid YAML: {shown(str(e), quote=False)}") from None
    return raw


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """A copy of a job mapping with `--set KEY=VALUE` overrides applied (values read as YAML)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        _apply_override(raw, item)
    return raw


def job_from_mapping(raw: Any, base_dir: str | os.PathLike, overrides: list[str] = ()) -> Job:
    """A job from the mapping a job file holds (relative paths against `base_dir`), overridden and validated
    as `load_job` does. Raises JobError naming the key."""
    if not isinstance(raw, dict):
        raise JobError(f"job: expected a mapping of keys at the top level, got {_type_name(raw)}")
    raw = apply_overrides(raw, overrides)  # a copy: overrides must not change the caller's mapping
    job = _build(Job, raw, "")
    job.base_dir = str(Path(base_dir).resolve())
    job.input.base_dir = job.base_dir
    job.input.fill_format_columns()
    check_job(job)
    return job


def build_section(cls: type, raw: Any, key: str) -> Any:
    """One section of a job file (dataclass `cls`, e.g. EngineSpec) from its mapping, with the checks
    load_job makes: an unknown or mistyped key is a JobError naming `key.name`."""
    return _build(cls, raw, f"{key}.")


def _apply_override(raw: dict, item: str) -> None:
    """`--set a.b=value`: see `override_value` for how the value is read."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise JobError(f"--set: expected KEY=VALUE, got {shown(item)}")
    value = override_value(key, text)
    parts = key.split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise JobError(f"{shown('.'.join(parts[: depth + 1]), quote=False)}: is not a section, cannot set "
                           f"{shown(key, quote=False)}")
        node = child
    node[parts[-1]] = value


NULL_WORDS = ("null", "Null", "NULL", "~")  # YAML's spellings of null: they unset an optional string setting


def override_value(key: str, text: str) -> Any:
    """The value `--set KEY=TEXT` gives the dotted `key`. A string setting (a field typed `str` or `str | None`
    in batchvl.config.spec) takes TEXT verbatim, so a prompt may hold `#`, `: `, quotes and braces; only YAML's
    null words unset an optional one. Any other setting (numbers, booleans, lists, `engine.gpus`, a key that
    does not exist) reads TEXT as YAML, so `output.keep_columns=[a, b]` is a list; text that is not YAML stays
    text, and the type check names the key."""
    hint = setting_type(key)
    if hint is not None and _is_string_hint(hint):
        optional = type(None) in typing.get_args(hint)
        return None if optional and text.strip() in NULL_WORDS else text
    if not text.strip():
        return ""
    try:
        return _load_yaml(text)
    except _Refused as e:
        raise JobError(f"--set {shown(key, quote=False)}: {e.problem}") from None
    except (yaml.YAMLError, ValueError):
        return text


def setting_type(key: str) -> Any:
    """The type hint of a dotted job key (`generation.seed`: int), from the section dataclasses; None for a key
    that names no setting."""
    cls: Any = Job
    hint = None
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls):
            return None
        fields = {f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
        if part not in fields:
            return None
        hint = typing.get_type_hints(cls)[part]
        cls = hint
    return hint


def _is_string_hint(hint: Any) -> bool:
    """`str`, or `str | None`: a setting whose every value is text."""
    if hint is str:
        return True
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(hint) if a is not type(None)] == [str]
    return False


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a mapping, checking unknown keys, missing keys and types."""
    where = prefix.rstrip(".") or "job"
    if not isinstance(raw, dict):
        raise JobError(f"{where}: expected a mapping, got {_type_name(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    problems = Problems()  # every key's problem is reported, not only the first
    for key in raw:
        if key not in fields:
            known = ", ".join(sorted(fields))
            problems.add(f"{prefix}{shown(key, quote=False)}: unknown key (known keys here: {known})")
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        if name not in raw:
            no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if no_default:
                problems.add(f"{key}: missing (required)")
            continue
        with problems.check():
            kwargs[name] = _convert(hints[name], raw[name], key)
    problems.raise_any()
    return cls(**kwargs)


def _convert(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, {} if value is None else value, key + ".")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        if len(args) == 1:
            return _convert(args[0], value, key)
        for arg in args:  # the first type the value fits (str | int | list[int]: "auto", 2, [0, 1])
            if not _fits(arg, value):
                continue
            return _convert(arg, value, key)
        names = " or ".join(_HINT_NAMES.get(a, str(a)) for a in args)
        raise JobError(f"{key}: expected {names}, got {_type_name(value)} {shown(value)}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise JobError(f"{key}: expected a list, got {_type_name(value)}")
        return [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise JobError(f"{key}: expected true or false, got {_type_name(value)} {shown(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise JobError(f"{key}: expected an integer, got {_type_name(value)} {shown(value)}")
        if not -INT_LIMIT <= value < INT_LIMIT:
            raise JobError(f"{key}: {shown(value, quote=False)} does not fit in 64 bits")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise JobError(f"{key}: expected a number, got {_type_name(value)} {shown(value)}")
        try:
            number = float(value)
        except OverflowError:  # an integer of hundreds of digits
            number = math.inf
        if not math.isfinite(number):  # .nan, .inf, or an integer too large for a float
            raise JobError(f"{key}: must be a finite number, got {shown(value, quote=False)}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise JobError(f"{key}: expected a string, got {_type_name(value)} {shown(value)}")
        return value
    raise TypeError(f"unsupported field type {hint!r} for {key}")  # a bug in this module, not in the job


INT_LIMIT = 1 << 63  # an integer setting must fit in 64 bits (torch, numpy and the seeds take int64)
MAX_DEPTH = 32  # nesting levels a job file may have; its sections need 3


class _Refused(yaml.composer.ComposerError):
    """YAML that a job file may not use, though it is valid YAML."""


class _JobLoader(yaml.SafeLoader):
    """PyYAML's safe loader without anchors and aliases, and with bounded nesting.

    An alias is a reference: a few hundred bytes of `&a [*b, *b, ...]` lines describe a value of gigabytes
    (the "billion laughs"), which every later step that walks or prints it expands; and nesting thousands of
    levels deep overflows the stack. A job file needs neither, so both are refused while the file is read.
    """

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            sign = "*" if isinstance(event, yaml.AliasEvent) else "&"
            raise _Refused(problem=f"YAML anchors and aliases are not allowed in a job file (found "
                                   f"{sign}{shown(anchor, quote=False)})", problem_mark=event.start_mark)
        if self.depth >= MAX_DEPTH:
            raise _Refused(problem=f"nested more than {MAX_DEPTH} levels deep", problem_mark=event.start_mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_JobLoader)  # _JobLoader is a SafeLoader


_HINT_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list[int]: "a list"}


def _fits(hint: Any, value: Any) -> bool:
    if typing.get_origin(hint) is list:
        return isinstance(value, list)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number"}.get(type(value), type(value).__name__)
