"""Per-token KL estimates between the policy and the reference model, and the
controllers that choose the KL penalty coefficient beta.

Shapes: ``b`` = batch, ``t`` = response length.
"""

from __future__ import annotations

from torch import Tensor

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(policy || ref) for tokens sampled from the policy.

    With ``log_ratio = ref_logprobs - logprobs`` (i.e. ``log(ref / policy)``)::

        k1 = logprobs - ref_logprobs = -log_ratio          (unbiased, can be < 0)
        k2 = log_ratio^2 / 2                               (biased, always >= 0; its gradient is k1's score)
        k3 = exp(log_ratio) - 1 - log_ratio                (unbiased, always >= 0)

    (Schulman 2020, "Approximating KL divergence".)

    Args:
        logprobs: ``(b, t)`` policy log-probabilities of the sampled tokens.
        ref_logprobs: ``(b, t)`` reference-model log-probabilities of the same tokens.
        estimator: one of ``KL_ESTIMATORS``.

    Returns:
        ``(b, t)`` per-token KL estimates (masking is the caller's job).
    """
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k2":
        return 0.5 * (ref_logprobs - logprobs) ** 2
    if estimator == "k3":
        log_ratio = ref_logprobs - logprobs
        return log_ratio.exp() - 1.0 - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; allowed: {', '.join(KL_ESTIMATORS)}")


class FixedKLController:
    """Constant KL coefficient: ``value`` never changes."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op (kept so both controllers share one interface)."""

    def state_dict(self) -> dict:
        return {"value": float(self.value)}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller steering the observed KL towards ``target``.

    Ziegler et al. (2019), "Fine-Tuning Language Models from Human Preferences"::

        error = clip(current_kl / target - 1, -0.2, 0.2)
        value = value * (1 + error * n_steps / horizon)

    ``n_steps`` is the number of samples (episodes) seen since the last update.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if not target > 0:
            raise ValueError(f"target KL must be > 0, got {target}")
        if not horizon > 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": float(self.value), "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))
