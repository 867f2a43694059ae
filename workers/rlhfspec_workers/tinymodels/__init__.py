"""Tiny-model kit: deterministic small HF-format models (policy, draft, reward) for local runs.

Where it sits: models cannot be downloaded on the development machines or in CI, so the data
plane's tests, benchmarks and example manifests (``tiny://policy`` etc.) run on models this
package trains from a seeded recipe on the synthetic sort-digits task (``task.py``). Importing
the package does not import torch: only building (``pipeline.py``) does.
"""

from rlhfspec_workers.tinymodels.build import (
    KIT_FILE,
    build_tiny_models,
    default_kit_dir,
    ensure_tiny_models,
    load_report,
    resolve_model_uri,
)
from rlhfspec_workers.tinymodels.recipe import RECIPE_VERSION, TinyRecipe
from rlhfspec_workers.tinymodels.report import KitReport
from rlhfspec_workers.tinymodels.task import TaskExample, make_examples, score

__all__ = [
    "KIT_FILE",
    "RECIPE_VERSION",
    "KitReport",
    "TaskExample",
    "TinyRecipe",
    "build_tiny_models",
    "default_kit_dir",
    "ensure_tiny_models",
    "load_report",
    "make_examples",
    "resolve_model_uri",
    "score",
]
