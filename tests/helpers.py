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

#: tiny random models of eighteen families, each with what it does of its own around its linear
#: layers: family -> (its architecture beyond the shared sizes, its linear modules)
_SIZES = ("num_hidden_layers:2,hidden_size:64,num_attention_heads:4,vocab_size:257,initializer_range:0.2,"
          "max_position_embeddings:512")
_LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_NEOX = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
_GQA = "intermediate_size:128,num_key_value_heads:2"
FAMILIES = {
    "qwen2": (_GQA, _LLAMA_LIKE),  # biases on q, k, v
    "qwen3": (f"head_dim:16,{_GQA}", _LLAMA_LIKE),  # q and k norms
    "mistral": (f"sliding_window:8,{_GQA}", _LLAMA_LIKE),
    "gemma": (f"head_dim:16,{_GQA}", _LLAMA_LIKE),  # scaled embeddings
    "gemma2": (f"head_dim:16,{_GQA}", _LLAMA_LIKE),  # soft-capped attention scores and logits
    "gemma3_text": (f"head_dim:16,sliding_window:128,layer_types:[sliding_attention,full_attention],{_GQA}",
                    _LLAMA_LIKE),  # a sliding window longer than the rows: the pack's attention
    "olmo2": (_GQA, _LLAMA_LIKE),
    "granite": (f"logits_scaling:8.0,{_GQA}", _LLAMA_LIKE),  # scaled logits
    "cohere": (_GQA, _LLAMA_LIKE),  # scaled logits
    "stablelm": (_GQA, _LLAMA_LIKE),
    "phi3": (_GQA, ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),  # fused projections
    "phi": (_GQA, ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")),  # parallel attention and MLP
    "starcoder2": (f"sliding_window:null,{_GQA}", ("q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj")),
    "mixtral": (f"sliding_window:null,num_local_experts:4,num_experts_per_tok:2,{_GQA}", _LLAMA_LIKE[:4]),
    # attention sinks, which the pack's attention does not do (it keeps the model's), and experts
    "gpt_oss": (f"head_dim:16,sliding_window:128,num_local_experts:4,num_experts_per_tok:2,{_GQA}", _LLAMA_LIKE[:4]),
    "gpt_neox": ("intermediate_size:128", _NEOX),
    "falcon": ("new_decoder_architecture:false,multi_query:true", _NEOX),
    # latent attention; hidden states scaled before the head
    "minicpm3": ("intermediate_size:128,num_key_value_heads:4,q_lora_rank:16,kv_lora_rank:16,qk_nope_head_dim:8,"
                 "qk_rope_head_dim:8,v_head_dim:16,dim_model_base:16",
                 ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
                  "down_proj")),
}
#: the families whose logits are not their LM head's output alone (soft-capped or scaled, or the
#: head's input scaled)
TRANSFORMED_LOGITS = ("gemma2", "granite", "cohere", "minicpm3")


def family_model(family: str) -> list[str]:
    """Overrides for a tiny random model of `family` (FAMILIES): every preset is all its modules."""
    arch, modules = FAMILIES[family]
    every = "[" + ",".join(modules) + "]"
    return ["model=tiny_llama", f"model.architecture={{model_type:{family},{_SIZES},{arch}}}",
            f"model.modules={every}", f"model.target_presets={{qv:{every},attn:{every},all_linear:{every}}}"]


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
