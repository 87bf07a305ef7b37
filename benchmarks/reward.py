"""The benchmarks' reward: cheap and deterministic, so the score phase costs almost nothing."""


def reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Share of lowercase vowels among a response's characters."""
    return [sum(c in "aeiou" for c in r) / max(len(r), 1) for r in responses]
