"""Rollout generation on the training model: the recording decode loop or `model.generate`."""

from rlhfkit.rollout.generation import (
    GeneratedBatch,
    HFGenerator,
    check_generation_supported,
    full_weights_for_generation,
)

__all__ = ["GeneratedBatch", "HFGenerator", "check_generation_supported", "full_weights_for_generation"]
