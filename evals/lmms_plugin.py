"""The `lmms_eval.models` entry point (pyproject.toml): lmms-eval reads this manifest when it starts and imports
`evals.lmms_model` only when `--model visinstruct` is asked for."""
from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = ModelManifest(model_id="visinstruct", simple_class_path="evals.lmms_model.Visinstruct")
