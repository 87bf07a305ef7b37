"""Save trained weights: a LoRA adapter (PEFT format) or a full model, plus tokenizer and value head."""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel

from rlhfkit.models.loading import POLICY_ADAPTER
from rlhfkit.models.value_head import ValueHead


def save_pretrained_model(model, tokenizer, directory: str | Path, value_head: ValueHead | None = None) -> Path:
    """Write weights as safetensors into `directory` (created if needed).

    A PeftModel saves only its trainable `default` adapter (loadable with
    `PeftModel.from_pretrained(base, directory)`); a plain model saves everything (loadable with
    `AutoModelForCausalLM.from_pretrained(directory)`). The value head goes to
    `value_head.safetensors` beside them and never into the language model's weights.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PeftModel):
        model.save_pretrained(directory, selected_adapters=[POLICY_ADAPTER], safe_serialization=True)
    else:
        model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if value_head is not None:
        value_head.save(directory)
    return directory
