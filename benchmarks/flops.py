"""Floating-point operations a decoder-only transformer needs, counted over real tokens.

A multiply-add is 2 FLOPs. For a Llama-style model with hidden size ``h``, ``L`` layers, MLP
width ``f``, key/value width ``kv`` (heads x head size of K and V) and vocabulary ``V``:

    linear  per token   2 L (2 h^2 + 2 h kv + 3 h f)          q, o; k, v; gate, up, down
    attention per token  4 L h c                                QK^T and AV over c visible keys
    head    per position 2 h V                                  only where logits are needed
    LoRA    per token   2 L r (2h + 2(h + kv) + 2h + 2(h + f) + (f + h))    rank r on those 7

Backward w.r.t. activations costs one forward of every matmul; w.r.t. weights another one for
the matmuls whose weights train. So full fine-tuning's backward is 2x the forward; LoRA's is 1x
the frozen matmuls (activations only) + 2x attention (no weights) + 2x the LoRA matmuls. Norms,
activations, softmax and the optimizer are elementwise and left out (they are a few percent).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    intermediate: int
    kv_width: int
    vocab: int
    lora_rank: int = 0

    @classmethod
    def from_config(cls, config: dict, lora_rank: int = 0) -> "ModelShape":
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        return cls(config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"],
                   config.get("num_key_value_heads", heads) * head_dim, config["vocab_size"], lora_rank)

    @property
    def linear_per_token(self) -> int:
        h, kv, f = self.hidden, self.kv_width, self.intermediate
        return 2 * self.layers * (2 * h * h + 2 * h * kv + 3 * h * f)

    @property
    def lora_per_token(self) -> int:
        h, kv, f, r = self.hidden, self.kv_width, self.intermediate, self.lora_rank
        return 2 * self.layers * r * (2 * h + 2 * (h + kv) + 2 * h + 2 * (h + f) + (f + h))

    def attention(self, visible_keys: int) -> int:
        """Summed over queries: ``visible_keys`` = sum over query positions of the keys each sees."""
        return 4 * self.layers * self.hidden * visible_keys

    def head(self, positions: int) -> int:
        return 2 * self.hidden * self.vocab * positions


def causal_pairs(lengths: list[int]) -> int:
    """Query-key pairs of causal attention over rows of these real lengths: sum n(n+1)/2."""
    return sum(n * (n + 1) // 2 for n in lengths)


def forward_flops(shape: ModelShape, lengths: list[int], head_positions: int, lora: bool) -> int:
    """One forward pass over rows of ``lengths`` real tokens, logits at ``head_positions`` positions."""
    tokens = sum(lengths)
    per_token = shape.linear_per_token + (shape.lora_per_token if lora else 0)
    return per_token * tokens + shape.attention(causal_pairs(lengths)) + shape.head(head_positions)


def forward_backward_flops(shape: ModelShape, lengths: list[int], head_positions: int) -> int:
    """Forward + backward of the trained policy (full when ``shape.lora_rank`` is 0, else LoRA)."""
    tokens = sum(lengths)
    frozen = shape.linear_per_token * tokens + shape.head(head_positions)
    attention = shape.attention(causal_pairs(lengths))
    if shape.lora_rank == 0:
        return 3 * (frozen + attention)
    lora = shape.lora_per_token * tokens
    return 2 * frozen + 3 * attention + 3 * lora
