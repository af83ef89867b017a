"""`lora-exp generate RUN_ID "prompt"`: a run's adapter on its base model, from the terminal."""
from __future__ import annotations

import tempfile

from lora_exp.core.data import Prompt
from lora_exp.core.evaluation import generate
from lora_exp.core.models import load_base, pick_device
from lora_exp.runs.recorded import download_adapter, load_recorded, tracking_for


def cmd_generate(ref: str, prompts: list[str], max_new_tokens: int | None, overrides: list[str]) -> int:
    from peft import PeftModel

    client, recorded = load_recorded(ref, tracking_for(overrides))
    with tempfile.TemporaryDirectory() as tmp:
        adapter = download_adapter(client, recorded.run.info.run_id, tmp)
        base = load_base(recorded.config.model, pick_device(recorded.config.trainer.device))
        model = PeftModel.from_pretrained(base.model, adapter).to(base.device)
    texts = [p.encode().decode("unicode_escape") if "\\n" in p else p for p in prompts]
    outputs = generate(model, base.tokenizer, [Prompt(t, t, ()) for t in texts], base.device,
                       max_new_tokens or recorded.config.trainer.max_new_tokens)
    for text, output in zip(texts, outputs):
        print(f"{text}{'' if text.endswith(' ') else ' '}{output}")
    return 0

