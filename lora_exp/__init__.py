"""lora-exp: experiment-tracked hyperparameter sweeps for LoRA fine-tuning."""

__version__ = "0.1.0"
