"""Packed trials: K LoRA trials trained at once on ONE frozen base model, in one process.

`settings` is the `pack` config group; `model` holds every slot's LoRA weights in flat buffers
and wraps the base's linear layers (`layers`); `optimizer` steps every slot's AdamW at once;
`rows` turns data into padded device tables and per-slot losses; `attention` gives the pack's
right-padded rows a mask-free causal attention; `trainer` runs the slots (with `slots`, `drain`
and `finish`); `worker` and `io`/`sampler` drive a sweep's trials through a pack; `kernels`
holds the Triton kernels. docs/packed-trials.md says how and why."""
