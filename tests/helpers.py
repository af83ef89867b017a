"""What tests share besides fixtures: paths, the tiny configuration, the CLI in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cli_server import CliServer

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"

#: a tiny, fast configuration: random 2-layer GPT-2, the seed's five texts.
TINY = ["model=tiny_gpt2", "data=seed", "trainer.max_steps=30", "trainer.batch_size=5", "trainer.lr=1e-2",
        "trainer.eval_steps=10", "trainer.max_new_tokens=8", "trainer.warmup_steps=0",
        "trainer.generation_metrics=[exact_match,token_f1,rouge_l]"]

#: the tiny Llama's sizes, for tiny random models of other families (with the tiny Llama's modules)
_SIZES = ("num_hidden_layers:2,hidden_size:64,intermediate_size:128,num_attention_heads:4,num_key_value_heads:2,"
          "max_position_embeddings:512,vocab_size:257,initializer_range:0.2")


def _tiny(family: str) -> list[str]:
    return ["model=tiny_llama", f"model.architecture={{model_type:{family},{_SIZES}}}"]


#: families that change their logits after the LM head: Gemma 2 soft-caps them (and its attention
#: scores), Granite and Cohere scale them
TRANSFORMED_LOGITS = {"gemma2": _tiny("gemma2,head_dim:16"), "granite": _tiny("granite,logits_scaling:8.0"),
                      "cohere": _tiny("cohere")}
#: the same sizes in families whose logits are the head's output alone
PLAIN_LOGITS = {"qwen2": _tiny("qwen2"), "gemma": _tiny("gemma,head_dim:16")}


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 600):
    """The installed entry point in its own process: real exit codes, real stderr. The process is
    a fork of a server that has imported torch and transformers once (`cli_server.py`), or a
    fresh one where that could change what the call does (see there)."""
    exe = str(Path(sys.executable).parent / "lora-exp")
    full_env = {**os.environ, **(env or {})}
    server = CliServer.get()
    if server is not None and server.serves(args, full_env):
        return server.run([exe, *args], Path(cwd), full_env, timeout)
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


def popen_cli(*args: str, cwd: Path, env: dict[str, str] | None = None):
    """The entry point started and left running, as subprocess.Popen(stdout=PIPE, stderr=STDOUT,
    text=True) gives it: read its lines as they come, signal it, wait for it. Forked by the same
    server as `run_cli` where it can be (`cli_server.ServedProcess`), else a fresh process."""
    exe = str(Path(sys.executable).parent / "lora-exp")
    full_env = {**os.environ, **(env or {})}
    server = CliServer.get()
    if server is not None and server.serves(args, full_env):
        return server.popen([exe, *args], Path(cwd), full_env)
    return subprocess.Popen([exe, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=full_env)


def load_study(storage: str, name: str = "tiny"):
    """The Optuna study as the sweep left it (opened as lora-exp opens it: under the store's lock,
    so a poll while a sweep creates the tables does not race it)."""
    import optuna

    from lora_exp.sweep.storage import rdb_storage

    return optuna.load_study(study_name=name, storage=rdb_storage(storage) if "://" in storage else storage)


def parent_files(client, run_id: str) -> dict[str, int]:
    """The parent run's tables and plots as its local artifact store holds them: path -> the time
    each file was last written (ns)."""
    from urllib.parse import urlparse

    root = Path(urlparse(client.get_run(run_id).info.artifact_uri).path)
    return {str(f.relative_to(root)): f.stat().st_mtime_ns for f in root.rglob("*")
            if f.is_file() and (f.suffix == ".png" or f.name in ("trials.json", "answers.json"))}


def sweep_runs(store: str):
    """(client, parent runs, trial runs) of the default experiment of an MLflow store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    exp = client.get_experiment_by_name("lora-exp")
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    parents = [r for r in runs if r.data.tags.get("lora_exp.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("lora_exp.kind") == "trial"]
    return client, parents, children
