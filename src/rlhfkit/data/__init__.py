"""Datasets for every stage: LLaMA-Factory-style dataset_info.json, file readers, chat
templates, tokenisation with truncation, collators and train/validation splits.

Typical use::

    specs = resolve_datasets("alpaca_demo,extra.jsonl", dataset_dir="data")
    examples = load_examples(specs, kind="sft", max_samples=1000)
    template = get_template("auto", tokenizer)
    samples, stats = tokenize_sft(examples, tokenizer, template, cutoff_len=1024)
    train, val = train_val_split(samples, 0.1, seed=42)
    batch = collate_sft(train[:8], tokenizer.pad_token_id)
"""

from __future__ import annotations

import importlib

# Names load on first use (PEP 562), so that `rlhfkit.data.templates` can be imported without
# torch (the collators need it): the config check of template names runs before torch is imported.
_SOURCES = {
    "collate_pairwise": "collators", "collate_prompts": "collators", "collate_sft": "collators",
    "pad_sequences": "collators",
    "DatasetSpec": "dataset_info", "detect_spec": "dataset_info", "resolve_datasets": "dataset_info",
    "Example": "example",
    "FormatTemplate": "format_template",
    "IGNORE_INDEX": "processing", "TokenizeStats": "processing", "tokenize_pairwise": "processing",
    "tokenize_prompts": "processing", "tokenize_sft": "processing",
    "KINDS": "readers", "load_examples": "readers",
    "train_val_split": "splits",
    "TEMPLATES": "template_library",
    "Template": "templates", "get_template": "templates", "template_for": "templates",
}

__all__ = sorted(_SOURCES)


def __getattr__(name: str):
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_SOURCES[name]}"), name)
    globals()[name] = value
    return value
