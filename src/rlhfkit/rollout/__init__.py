"""Rollout engines behind one interface (`RolloutEngine`: `sync_weights`, `generate`): the recording
decode loop on the training model, or the static-KV-cache engine for accelerators."""

from rlhfkit.rollout.engine import RecordingEngine, RolloutEngine, build_rollout_engine
from rlhfkit.rollout.generation import (
    GeneratedBatch,
    HFGenerator,
    check_generation_supported,
    full_weights_for_generation,
)
from rlhfkit.rollout.static import StaticCacheEngine

__all__ = ["GeneratedBatch", "HFGenerator", "RecordingEngine", "RolloutEngine", "StaticCacheEngine",
           "build_rollout_engine", "check_generation_supported", "full_weights_for_generation"]
