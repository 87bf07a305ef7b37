"""The KV cache goes to each model under the keyword its forward takes: ``cache`` in transformers' newer
models (which warn about ``past_key_values``), ``past_key_values`` in older ones (transformers 5.17's,
which take nothing else). Both rollout engines decode without a deprecation message, and decode the
same tokens from a model that takes only ``past_key_values``.

transformers reports the old keyword twice over: its ``deprecate_kwarg`` decorator raises a
``FutureWarning`` (`warnings`), and reading ``output.past_key_values`` logs through the ``transformers``
logger with ``warning_once`` (cached per process, so the cache is cleared before each capture).
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import torch
import transformers
from packaging.version import Version
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from conftest import random_lora
from rlhfkit.config import GenerationArguments
from rlhfkit.models.forward import cache_keyword
from rlhfkit.models.value_head import ModelWithValueHead
from test_rollout_engines import _both, _setup


class PastKeyValuesOnly(nn.Module):
    """A causal LM whose forward takes its KV cache only as ``past_key_values`` (as transformers 5.17's
    models do): ``cache=`` is a TypeError. It runs `lm` (a new Llama of `config` unless given)."""

    def __init__(self, config, lm: nn.Module | None = None) -> None:
        super().__init__()
        self.lm = lm if lm is not None else LlamaForCausalLM(config)
        self.config = self.lm.config
        self._inner_keyword = cache_keyword(self.lm)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
                logits_to_keep=0):
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=use_cache, logits_to_keep=logits_to_keep,
                       **{self._inner_keyword: past_key_values})


class _Collect(logging.Handler):
    def __init__(self, messages: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def past_key_values_deprecations():
    """The messages about ``past_key_values`` that transformers emits inside: its warnings and its logger's."""
    messages: list[str] = []
    handler = _Collect(messages)
    library_logger = logging.getLogger("transformers")  # every transformers module logs below it
    hf_logging.warning_once.cache_clear()  # a message logged once already would otherwise stay silent
    library_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
    finally:
        library_logger.removeHandler(handler)
    messages.extend(str(warning.message) for warning in caught)
    messages[:] = [message for message in messages if "past_key_values" in message]


def _complains_about_past_key_values(model) -> bool:
    """Whether `model` reports a deprecation when given its KV cache as ``past_key_values``."""
    ids = torch.tensor([[5, 6, 7]])
    with past_key_values_deprecations() as messages, torch.no_grad():
        model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True)
    return bool(messages)


def test_the_keyword_is_cache_where_the_model_deprecates_past_key_values_through_every_wrapper(tiny_model_dir):
    """Expected from the model's behaviour: ``cache`` where passing ``past_key_values`` draws a deprecation
    (transformers >= 5.24's models, the installed ones), ``past_key_values`` where it does not."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    expected = "cache" if _complains_about_past_key_values(model) else "past_key_values"
    if Version(transformers.__version__) >= Version("5.24"):  # the renamed keyword (5.17's models lack it)
        assert expected == "cache"
    assert cache_keyword(model) == expected
    assert cache_keyword(ModelWithValueHead(model, None)) == expected
    assert cache_keyword(torch.compile(model)) == expected  # compiles on its first call only: none here
    peft = random_lora(model, seed=1)
    assert cache_keyword(peft) == expected
    assert cache_keyword(ModelWithValueHead(peft, None)) == expected
    old = PastKeyValuesOnly(model.config)
    assert cache_keyword(old) == "past_key_values"
    assert cache_keyword(ModelWithValueHead(old, None)) == "past_key_values"


def test_both_engines_decode_without_a_past_key_values_deprecation(tiny_model_dir):
    """The recording loop and the static engine, prefill and decode steps alike. The capture
    itself is checked on the model: where it takes ``cache``, the old keyword is reported."""
    tokenizer, model, ids, mask = _setup(tiny_model_dir)
    if cache_keyword(model) == "cache":
        assert _complains_about_past_key_values(model)  # the capture sees what transformers reports
    args = GenerationArguments(do_sample=False, max_new_tokens=4)
    with past_key_values_deprecations() as messages:
        recorded, static = _both(tokenizer, model, ids, mask, args, [tokenizer.eos_token_id], interval=2)
    assert messages == []
    assert recorded.response_ids.shape[1] > 1 and static.response_ids.shape[1] > 1  # several decode steps ran


def test_a_model_taking_only_past_key_values_decodes_the_same_tokens(tiny_model_dir):
    """Both engines, sampled with one seed: the stand-in runs the same model, so the same logits, the same draws."""
    tokenizer, model, ids, mask = _setup(tiny_model_dir)
    old = PastKeyValuesOnly(model.config, lm=model).eval()
    args = GenerationArguments(do_sample=True, temperature=0.7, max_new_tokens=8)
    stop = [tokenizer.eos_token_id]
    expected = _both(tokenizer, model, ids, mask, args, stop, interval=3)
    for batch, reference in zip(_both(tokenizer, old, ids, mask, args, stop, interval=3), expected):
        assert torch.equal(batch.response_ids, reference.response_ids)
    assert expected[0].response_ids.shape[1] > 1 and len({tuple(r.tolist()) for r in expected[0].response_ids}) > 1
