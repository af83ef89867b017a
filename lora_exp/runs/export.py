"""`lora-exp export RUN_ID --out DIR [--merge]`: a run's adapter (or the model merged with it) and
its tokenizer in a folder, with the run id and config it came from."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from lora_exp.core.models import load_base
from lora_exp.errors import ConfigError
from lora_exp.runs.recorded import download_adapter, load_recorded, tracking_for
from lora_exp.tracking.provenance import redact_uri


def cmd_export(ref: str, out: str, merge: bool, force: bool, overrides: list[str]) -> int:
    target = Path(out).expanduser()
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not force:
        raise ConfigError(f"export: {out} exists and is not empty (use --force to overwrite)")
    writable(target.parent, out)  # before the run is read and the model loaded
    client, recorded = load_recorded(ref, tracking_for(overrides))
    run_id = recorded.run.info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        adapter = download_adapter(client, run_id, tmp)
        base = load_base(recorded.config.model, torch.device("cpu"))
        staging = Path(tempfile.mkdtemp(prefix=".export-", dir=target.parent))
        try:
            if merge:
                from peft import PeftModel

                model = PeftModel.from_pretrained(base.model, adapter).merge_and_unload()
                model.save_pretrained(staging)
            else:
                for f in Path(adapter).iterdir():
                    shutil.copy2(f, staging / f.name)
            base.tokenizer.save_pretrained(staging)
            (staging / "lora_exp_export.json").write_text(json.dumps({
                "run_id": run_id, "via": recorded.via_parent, "merged": merge,
                "tracking_uri": redact_uri(recorded.config.tracking.uri), "config": recorded.raw}, indent=1))
            if target.exists():
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    kind = "merged model" if merge else "adapter"
    how = "AutoModelForCausalLM.from_pretrained(DIR)" if merge else "PeftModel.from_pretrained(base, DIR)"
    print(f"exported the {kind} of run {run_id} to {target} (load with {how})")
    return 0


def writable(folder: Path, out: str) -> None:
    """`folder` exists (made if need be) and takes a new file: else one line, exit 2."""
    import os

    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=".export-check-", dir=folder))
    except OSError as exc:
        raise ConfigError(f"export: cannot write {out}: {exc.strerror or exc}") from None
