"""Speed-ups that pay only on a CPU, in one package, behind one switch (`cpu_speedups`).

Each changes where memory comes from or which kernel runs, never the result beyond float
rounding (each is tested against the plain computation):

* `allocator`: glibc malloc keeps freed blocks; transparent huge pages for large tensors.
* `gradients`: every gradient a view of one block allocated before the first pass; sparse
  embedding gradients added into it.
* `head`, `buffers`: the LM head writes its logits into a kept buffer and adds its weight
  gradient in place.
* `logprobs`: the update's vocabulary-sized log-softmax in a kept buffer.
* `lora_decoding`: a lean forward for plain LoRA layers while decoding.
* `sampling`: tokens drawn by inverting the CDF instead of ``torch.multinomial``.

With ``cpu_speedups: auto`` (the default) they are on for a run on a CPU device in one process
(not sharded); elsewhere, or with ``off``, every stage runs the plain path. Nothing here changes
anything process-wide on import: huge pages are requested by the command-line entry (before
torch allocates), the malloc settings when a stage starts. The switch itself is
`cpu.speedups.CpuSpeedups` (this package's `__init__` imports nothing, so the entry can use
`cpu.allocator` before torch is imported).
"""
