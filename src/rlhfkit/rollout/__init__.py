"""Rollout generation behind one small interface (Hugging Face generate today)."""

from rlhfkit.rollout.generation import (
    GeneratedBatch,
    HFGenerator,
    check_generation_supported,
    full_weights_for_generation,
)

__all__ = ["GeneratedBatch", "HFGenerator", "check_generation_supported", "full_weights_for_generation"]
