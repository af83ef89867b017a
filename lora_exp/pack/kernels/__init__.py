"""The pack's Triton kernels, each a torch custom op (or launcher) with a torch reference it is
tested against: `adamw` (the optimizer over every slot's live blocks), `lora` (each slot's LoRA
delta, its own rank and modules only; `lora_tiled`: its backward for long row groups), `head`
(the next-token loss and the logits' gradient), `attention` (causal attention over short rows),
and `hash` (the counter hash of `core.randomness`, bit for bit, and the dropout masks on it)."""
