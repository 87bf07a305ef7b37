"""The check before trained weights are written: finite outputs on a small probe batch.

Finite weights can still be ruined (a huge learning rate leaves them around 1e30, and every
logit NaN); one forward pass over a short text shows it before a checkpoint or the final model
is written.
"""

from __future__ import annotations

import torch

from rlhfkit.errors import fail
from rlhfkit.models.forward import causal_lm_forward
from rlhfkit.models.value_head import ModelWithValueHead
from rlhfkit.training.control import resume_hint
from rlhfkit.training.distributed import global_sums

PROBE_TEXT = "Hello! Please summarise this sentence in five words."


def probe_ids(tokenizer, device) -> torch.Tensor:
    """The probe batch ``(1, T)``: `PROBE_TEXT` in the tokenizer's tokens (EOS alone if it yields none)."""
    ids = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"][:32] or [tokenizer.eos_token_id]
    return torch.tensor([ids], device=device)


@torch.no_grad()
def check_outputs_finite(accelerator, prepared, ids: torch.Tensor, what: str, output_dir=None) -> None:
    """Refuse (one line naming `what`, the thing not written, and the last checkpoint in `output_dir`)
    when `prepared` gives a non-finite logit or value on `ids`.

    Every process calls this: the pass through a sharded module and the verdict are collective.
    The random streams are left as they were (dropout may be on), so a probe never changes a run.
    """
    unwrapped = accelerator.unwrap_model(prepared)
    with_values = isinstance(unwrapped, ModelWithValueHead) and unwrapped.value_head is not None
    on_accelerator = ids.device.type != "cpu"  # its random stream is forked too
    with torch.random.fork_rng(devices=[ids.device] if on_accelerator else [],
                               device_type=ids.device.type if on_accelerator else None), accelerator.autocast():
        extra = {"with_values": True} if with_values else {}
        output = causal_lm_forward(prepared, ids, torch.ones_like(ids), **extra)
        bad = not bool(torch.isfinite(output.logits).all())
        if with_values:
            bad = bad or not bool(torch.isfinite(output["values"]).all())
    (count,) = global_sums(accelerator, float(bad))
    if count:
        raise fail(f"the trained weights give non-finite {'logits or values' if with_values else 'logits'} "
                   f"on a probe text; not writing {what}. Lower learning_rate (or set max_grad_norm), "
                   f"or resume from {resume_hint(output_dir)}")
