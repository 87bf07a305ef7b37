"""Configuration: typed dataclasses, YAML loading with overrides, validation."""

from rlhfkit.config.arguments import (
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
from rlhfkit.config.loader import Config, build_config, closest_key, load_config, read_yaml
from rlhfkit.config.validation import report_to_list

__all__ = [
    "IGNORED_KEYS", "SECTIONS", "Config", "DataArguments", "ExportArguments", "FinetuningArguments", "GenerationArguments",
    "ModelArguments", "OutputArguments", "PPOArguments", "TrainingArguments", "build_config",
    "closest_key", "load_config", "read_yaml", "report_to_list",
]
