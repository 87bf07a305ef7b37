"""A Python callable as reward source: `module:callable` or `path/to/file.py:callable`."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Callable

import torch

from rlhfkit.errors import fail
from rlhfkit.rewards.base import ScoringBatch, checked_scores


def import_callable(spec: str) -> Callable:
    """Resolve `module:callable` (importable module or a .py file path) to the callable."""
    if ":" not in spec:
        raise fail(f"reward function '{spec}' must look like module:callable or path/to/file.py:callable")
    module_name, attribute = spec.rsplit(":", 1)
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise fail(f"reward function file {path} does not exist")
            unique = f"rlhfkit_reward_{abs(hash(str(path.resolve())))}"
            module_spec = importlib.util.spec_from_file_location(unique, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[unique] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as err:
        raise fail(f"cannot import reward function module '{module_name}': {err}") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise fail(f"'{attribute}' in {module_name} is not a callable; reward_model must name a function")
    return function


def takes_answers(function: Callable) -> bool:
    """Whether `function` accepts an ``answers`` keyword (a parameter of that name, or ``**kwargs``)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature
        return False
    return any(p.name == "answers" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


class FunctionReward:
    """Calls `fn(prompts, responses) -> list[float]`; rule-based and verifiable rewards.

    A function that accepts ``answers`` also gets each row's reference answer (the prompt row's final
    assistant reply in the data, None where it has none), as `rlhfkit.rewards.rules.math_answer` needs.
    """

    def __init__(self, spec: str, name: str | None = None) -> None:
        self.name = name or spec.rsplit(":", 1)[-1]
        self.function = import_callable(spec)
        self.with_answers = takes_answers(self.function)

    def score(self, batch: ScoringBatch) -> torch.Tensor:
        extra = {"answers": list(batch.answers or [None] * len(batch.responses))} if self.with_answers else {}
        try:
            values = self.function(list(batch.prompts), list(batch.responses), **extra)
        except Exception as err:  # a user function may raise anything
            detail = " ".join(str(err).split())  # one line, whatever the function's message
            raise fail(f"reward function '{self.name}' raised {type(err).__name__}: {detail}") from None
        return checked_scores(self.name, values, len(batch.responses))
