"""The built-in demo: SmolLM2-135M-Instruct learns to write upbeat one-sentence movie reviews."""
