"""The pack's Triton kernels, each a torch custom op (or launcher) with a torch reference it is
tested against: `adamw` (the optimizer over every slot's live blocks), `lora` (each slot's LoRA
delta, its own rank and modules only), `attention` (causal attention over short rows), and
`hash` (the counter hash of `core.randomness`, bit for bit)."""
