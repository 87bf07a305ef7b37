"""rlhfkit: SFT -> reward model -> PPO for Hugging Face causal language models.

Importing the package changes nothing process-wide; CPU tuning is applied by `rlhfkit.cli` and
the stages (see `rlhfkit.cpu`).
"""

__version__ = "0.1.0"
