"""Shared fixtures: a tiny character-level Llama built once per session, and data-file helpers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhfkit.models.tiny import build_tiny_model

torch.set_num_threads(1)  # tiny models: thread start-up costs more than it saves


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Llama with a character vocabulary (about 0.1M parameters)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write `rows` as JSON lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def jsonl():
    return write_jsonl
