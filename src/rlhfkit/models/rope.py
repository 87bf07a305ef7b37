"""`rope_scaling`: stretch a model's rotary position embedding beyond its trained length, as LLaMA-Factory does.

While training, the factor is ``ceil(cutoff_len / L)`` with L the model's original maximum length
(`original_max_position_embeddings` of an already scaled RoPE, else `max_position_embeddings`), and
nothing changes when cutoff_len <= L. Outside training (chat, eval, export) the factor is 2.
`max_position_embeddings` becomes ``L x factor``. dynamic and yarn also record L; llama3 records L
with low_freq_factor 1 and high_freq_factor 4.
"""

from __future__ import annotations

import logging
import math

logger = logging.getLogger(__name__)

INFERENCE_FACTOR = 2.0


def rope_settings(method: str, original_length: int, factor: float) -> dict:
    """The RoPE scaling entries for `method` (linear, dynamic, yarn, llama3)."""
    settings = {"rope_type": method, "factor": factor}
    if method in ("dynamic", "yarn", "llama3"):
        settings["original_max_position_embeddings"] = original_length
    if method == "llama3":
        settings.update(low_freq_factor=1.0, high_freq_factor=4.0)
    return settings


def apply_rope_scaling(config, method: str | None, max_length: int | None) -> None:
    """In place on a transformers `config`: RoPE scaling `method` for sequences of `max_length`
    tokens (None: inference). Models without RoPE are left alone with a warning, as LLaMA-Factory does."""
    if method is None:
        return
    # transformers 5 keeps rope_theta and the scaling in `rope_parameters`; 4.x in rope_theta + rope_scaling.
    params_key = "rope_parameters" if hasattr(config, "rope_parameters") else "rope_scaling"
    current = getattr(config, params_key, None)
    if not hasattr(config, params_key) or not hasattr(config, "max_position_embeddings") or \
            (isinstance(current, dict) and current and all(isinstance(v, dict) for v in current.values())):
        logger.warning("rope_scaling: this model (%s) has no single RoPE to scale; left unchanged",
                       getattr(config, "model_type", "?"))
        return
    current = dict(current or {})
    original = current.get("original_max_position_embeddings") or config.max_position_embeddings
    if max_length is not None:
        if max_length <= original:
            logger.warning("rope_scaling: cutoff_len %d fits the model's %d positions; RoPE left unscaled",
                           max_length, original)
            return
        factor = float(math.ceil(max_length / original))
    else:
        factor = INFERENCE_FACTOR
    if method == "dynamic" and max_length is not None:
        logger.warning("rope_scaling: dynamic NTK scaling may not work well with fine-tuning")
    kept = {k: current[k] for k in ("rope_theta", "partial_rotary_factor") if k in current}
    setattr(config, params_key, {**kept, **rope_settings(method, original, factor)})
    config.max_position_embeddings = int(original * factor)
    logger.info("rope_scaling %s: factor %g, max positions %d -> %d", method, factor, original,
                config.max_position_embeddings)
