"""rlhfkit: SFT -> reward model -> PPO for Hugging Face causal language models."""

from rlhfkit.training.allocator import request_huge_pages

request_huge_pages()  # before anything imports torch (PyTorch reads the switch once)

__version__ = "0.1.0"
