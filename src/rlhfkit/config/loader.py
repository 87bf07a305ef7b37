"""Read a YAML config plus `key=value` overrides into a typed, validated `Config`."""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlhfkit.config.arguments import (
    DEFAULT_ONLY_KEYS,
    IGNORED_KEYS,
    SECTIONS,
    DataArguments,
    ExportArguments,
    FinetuningArguments,
    GenerationArguments,
    ModelArguments,
    OutputArguments,
    PPOArguments,
    TrainingArguments,
)
from rlhfkit.accelerator.defaults import apply_device_defaults
from rlhfkit.config.validation import check_default_only, check_stage, resolve_gradient_checkpointing, validate
from rlhfkit.config.yaml_files import parse_yaml, read_yaml
from rlhfkit.errors import fail, shown


@dataclass
class Config:
    """The whole configuration of one run, one attribute per concern."""

    model: ModelArguments = field(default_factory=ModelArguments)
    data: DataArguments = field(default_factory=DataArguments)
    finetuning: FinetuningArguments = field(default_factory=FinetuningArguments)
    training: TrainingArguments = field(default_factory=TrainingArguments)
    generation: GenerationArguments = field(default_factory=GenerationArguments)
    ppo: PPOArguments = field(default_factory=PPOArguments)
    output: OutputArguments = field(default_factory=OutputArguments)
    export: ExportArguments = field(default_factory=ExportArguments)
    ignored_keys: list[str] = field(default_factory=list)
    """LLaMA-Factory keys that were present but have no effect here."""
    source: str = "<overrides>"
    """Where the config came from, for messages."""


def _key_owners() -> dict[str, tuple[str, dataclasses.Field]]:
    owners = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            owners[f.name] = (section, f)
    return owners


KEY_OWNERS = _key_owners()


def closest_key(key: str) -> str | None:
    """The valid key that looks most like `key`, if any is close."""
    match = difflib.get_close_matches(key, list(KEY_OWNERS) + list(IGNORED_KEYS) + list(DEFAULT_ONLY_KEYS), n=1,
                                      cutoff=0.6)
    return match[0] if match else None


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


_HINTS = {name: _type_hints(cls) for name, cls in SECTIONS.items()}


# String keys whose values include YAML 1.1's boolean words: the bool read back as the word meant.
SWITCH_WORDS = {"cpu_speedups": {True: "auto", False: "off"}, "rollout_compile": {True: "on", False: "off"}}


def _coerce(key: str, value: Any, hint: Any, where: str) -> Any:
    """Check `value` against the field's type; accept ints for floats and strings for numbers."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union:
        if value is None:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(key, value, non_none[0], where)
    if hint is Any:
        return value
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list"}
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int beyond float's range
                number = math.inf
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise fail(f"{where}: key '{key}' must be a finite number, got {shown(value)}")
            return number
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool) and key in SWITCH_WORDS:  # YAML 1.1 reads a bare `off` / `on` as a bool
            return SWITCH_WORDS[key][value]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return ",".join(value)
    elif hint is list or origin is list:
        if isinstance(value, list):
            return value
    else:
        return value
    raise fail(f"{where}: key '{key}' must be {expected.get(hint, str(hint))}, got {shown(value)}")


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise fail(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = parse_yaml(raw, f"override {shown(key)}") if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def build_config(values: dict[str, Any], source: str = "<config>", check: bool = True) -> Config:
    """Turn a flat mapping of keys into a validated `Config`.

    A stage we do not have is refused first, before the keys that belong to it.
    """
    config = Config(source=source)
    if check:
        check_stage(source, values.get("stage", config.finetuning.stage))
    for key, value in values.items():
        key = str(key)
        if key in IGNORED_KEYS:
            config.ignored_keys.append(key)
            continue
        if key in DEFAULT_ONLY_KEYS:
            check_default_only(source, key, value, *DEFAULT_ONLY_KEYS[key])
            config.ignored_keys.append(key)
            continue
        if key not in KEY_OWNERS:
            suggestion = closest_key(key)
            hint = f"; did you mean '{suggestion}'?" if suggestion else "; see docs/configuration.md for the keys"
            raise fail(f"{source}: unknown key {shown(key)}{hint}")
        section, f = KEY_OWNERS[key]
        coerced = _coerce(key, value, _HINTS[section][f.name], source)
        setattr(getattr(config, section), key, coerced)
    resolve_gradient_checkpointing(config.training)
    if config.model.device == "cpu":  # the device is known already: its defaults now (no torch needed)
        apply_device_defaults(config, "cpu")
    if check:
        validate(config)
    return config


def load_config(path: str | Path | None, overrides: list[str] | None = None, check: bool = True) -> Config:
    """Read `path` (YAML) and apply `key=value` overrides on top; validate the result."""
    values: dict[str, Any] = read_yaml(path) if path is not None else {}
    for text in overrides or []:
        key, value = _parse_override(text)
        values[key] = value
    source = str(path) if path is not None else "<overrides>"
    return build_config(values, source=source, check=check)
