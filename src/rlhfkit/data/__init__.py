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

from rlhfkit.data.collators import collate_pairwise, collate_prompts, collate_sft, pad_sequences
from rlhfkit.data.dataset_info import DatasetSpec, detect_spec, resolve_datasets
from rlhfkit.data.example import Example
from rlhfkit.data.format_template import FormatTemplate
from rlhfkit.data.processing import (
    IGNORE_INDEX,
    TokenizeStats,
    tokenize_pairwise,
    tokenize_prompts,
    tokenize_sft,
)
from rlhfkit.data.readers import KINDS, load_examples
from rlhfkit.data.splits import train_val_split
from rlhfkit.data.template_library import TEMPLATES
from rlhfkit.data.templates import Template, get_template, template_for

__all__ = [
    "IGNORE_INDEX",
    "KINDS",
    "TEMPLATES",
    "DatasetSpec",
    "Example",
    "FormatTemplate",
    "Template",
    "TokenizeStats",
    "collate_pairwise",
    "collate_prompts",
    "collate_sft",
    "detect_spec",
    "get_template",
    "template_for",
    "load_examples",
    "pad_sequences",
    "resolve_datasets",
    "tokenize_pairwise",
    "tokenize_prompts",
    "tokenize_sft",
    "train_val_split",
]
