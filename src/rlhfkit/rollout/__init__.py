"""Rollout generation behind one small interface (Hugging Face generate today)."""

from rlhfkit.rollout.generation import GeneratedBatch, HFGenerator

__all__ = ["GeneratedBatch", "HFGenerator"]
