"""Ablations of 1D deformable attention: tasks, models, training, the runner and the results.

This wing depends on the layer (:mod:`deform_attn.attention`); the layer never imports it. The extra
``pip install "deform-attn[experiments]"`` brings ``mnist1d`` and ``aeon`` for two of the tasks.

Modules: :mod:`.tasks` (data, the task registry), :mod:`.variants` (the attention variants'
registry), :mod:`.models` (the encoder), :mod:`.train` (one run), :mod:`.grid` (presets, keys,
shards), :mod:`.schema` (the result record), :mod:`.records` (atomic JSONL), :mod:`.runner` (the
command), :mod:`.results` (aggregation, plots, the shipped results).

A new task is one function and one ``@register_task``; a new attention variant is one function and
one ``@register_variant``; a preset lists them by name.
"""

from .grid import PRESETS, build_grid
from .models import ModelConfig, build_model
from .results import load_published, paired_differences, summarize, to_dataframe
from .schema import Record
from .tasks import TASKS, TaskSpec, make_task, register_task
from .train import TrainConfig, train_and_evaluate
from .variants import ATTENTION_VARIANTS, Bug018DeformableAttention1D, Variant, bug018_sample, register_variant

__all__ = [
    "PRESETS",
    "build_grid",
    "TASKS",
    "TaskSpec",
    "register_task",
    "make_task",
    "ATTENTION_VARIANTS",
    "Variant",
    "register_variant",
    "Bug018DeformableAttention1D",
    "ModelConfig",
    "build_model",
    "bug018_sample",
    "TrainConfig",
    "train_and_evaluate",
    "Record",
    "summarize",
    "paired_differences",
    "to_dataframe",
    "load_published",
]
