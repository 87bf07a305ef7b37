"""Settings that pay only on an accelerator (GPU), chosen by device, beside `rlhfkit.cpu`'s CPU ones.

* `defaults`: the device-dependent defaults of keys left unset (micro-batch, evaluation chunk,
  chunked LM head) and the rollout engine `auto` picks.
* `matmul`: the `tf32` key (TF32 tensor cores for CUDA float32 products).
* `transfer`: host-to-device copies of training batches that do not wait for the device (pinned memory).

The accelerator's rollout engine itself (static KV cache, compiled decode step, merged LoRA copy)
lives with the other engines in `rlhfkit.rollout`. This package's `__init__` imports nothing
(the configuration resolves CPU defaults before torch is imported).
"""
