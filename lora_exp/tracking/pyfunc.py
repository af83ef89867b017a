"""The best adapter as an MLflow model: an MLflow 3 LoggedModel (pyfunc flavor) that holds the peft
adapter and the run's recorded config, loads its base model the way the run did, and answers
prompts. `mlflow.pyfunc.load_model("models:/<study>@best").predict(["Q: ...\\nA:"])` generates;
the adapter inside is a plain peft folder (`artifacts/adapter`)."""
from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from lora_exp import __version__

MODEL_NAME = "adapter"


class AdapterModel(mlflow.pyfunc.PythonModel):
    """A LoRA adapter on its base model. Input: prompts (a string, a list of strings, or a
    DataFrame whose first or `prompt` column holds them); output: the greedy answers.
    `params={"max_new_tokens": N}` overrides the run's generation length."""

    #: the model's signature is given when it is logged (a column of prompts, the max_new_tokens
    #: parameter), not read from `predict`'s type hints
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        import yaml
        from peft import PeftModel

        from lora_exp.compose import from_container
        from lora_exp.core.models import load_base, pick_device

        raw = yaml.safe_load(Path(context.artifacts["config"]).read_text())  # data: nothing is imported from it
        self.cfg = from_container(raw, raw.get("overrides") or [])
        self.base = load_base(self.cfg.model, pick_device(self.cfg.trainer.device))
        with warnings.catch_warnings():  # peft asks transformers 5 a deprecated name; not the user's to act on
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            self.model = PeftModel.from_pretrained(self.base.model, context.artifacts["adapter"])
        self.model.to(self.base.device)
        self.model.eval()

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would read them as the signature
        from lora_exp.core.data import Prompt
        from lora_exp.core.evaluation import generate

        prompts = _prompts(model_input)
        limit = int((params or {}).get("max_new_tokens") or self.cfg.trainer.max_new_tokens)
        return generate(self.model, self.base.tokenizer, [Prompt(p, p, ()) for p in prompts], self.base.device,
                        limit)


def _prompts(model_input: Any) -> list[str]:
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "columns"):  # a DataFrame, as `mlflow models serve` sends it
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return [str(v) for v in model_input[column].tolist()]
    return [str(v) for v in model_input]


def log_adapter_model(client: Any, run_id: str, source_run_id: str, experiment_id: str, name: str,
                      params: dict[str, str], tags: dict[str, str]) -> Any:
    """Log run `run_id`'s adapter and config as a LoggedModel (source run: `source_run_id`) and link
    the run's final metrics to it; returns the LoggedModel."""
    from mlflow.entities import Metric
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    signature = ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]),
                               params=ParamSchema([ParamSpec("max_new_tokens", "long", 0)]))
    with tempfile.TemporaryDirectory(prefix="lora-exp-model-") as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*type hints.*")  # the signature is given below
        adapter = client.download_artifacts(run_id, "adapter", tmp)
        config = client.download_artifacts(run_id, "config.yaml", tmp)
        folder = Path(tmp) / "model"
        # models from code: the model is this package's code, not a pickle
        mlflow.pyfunc.save_model(str(folder), python_model=str(Path(__file__).with_name("pyfunc_model.py")),
                                 artifacts={"adapter": adapter, "config": config}, signature=signature,
                                 pip_requirements=[f"lora-exp=={__version__}"], metadata={"lora_exp_run_id": run_id})
        model = client.create_logged_model(experiment_id, name=name, source_run_id=source_run_id, params=params,
                                           tags=tags, model_type="lora-adapter")
        client.log_model_artifacts(model.model_id, str(folder))
    model = client.finalize_logged_model(model.model_id, "READY")
    from mlflow.entities import LoggedModelOutput

    client.log_outputs(source_run_id, models=[LoggedModelOutput(model.model_id, step=0)])  # the run page lists it
    now = int(time.time() * 1000)
    metrics = client.get_run(run_id).data.metrics
    final = [Metric(k, float(v), now, 0, model_id=model.model_id) for k, v in metrics.items()
             if k.startswith(("final_", "exact_match"))]
    if final:
        client.log_batch(run_id, metrics=final, synchronous=True)
    return model
