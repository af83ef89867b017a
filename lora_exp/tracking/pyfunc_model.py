"""The MLflow model definition of a lora-exp adapter (MLflow "models from code": this file is
stored with each model and run when the model loads; it needs lora-exp installed)."""
import mlflow

from lora_exp.tracking.pyfunc import AdapterModel

mlflow.models.set_model(AdapterModel())
