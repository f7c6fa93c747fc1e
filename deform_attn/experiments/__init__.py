"""Ablations of 1D deformable attention: tasks, models, training, the runner and the results.

This wing depends on the layer (:mod:`deform_attn.attention`); the layer never imports it. The extra
``pip install "deform-attn[experiments]"`` brings ``mnist1d`` and ``aeon`` for two of the tasks.

Modules: :mod:`.tasks` (data), :mod:`.models` (encoder and attention kinds), :mod:`.train` (one run),
:mod:`.grid` (presets, keys, shards), :mod:`.records` (atomic JSONL), :mod:`.runner` (the command),
:mod:`.results` (aggregation, plots, the shipped results).
"""

from .grid import PRESETS, build_grid
from .models import ATTENTION_KINDS, Bug018DeformableAttention1D, ModelConfig, build_model, bug018_sample
from .results import load_published, paired_differences, summarize, to_dataframe
from .train import TrainConfig, train_and_evaluate

__all__ = [
    "PRESETS",
    "build_grid",
    "ATTENTION_KINDS",
    "Bug018DeformableAttention1D",
    "ModelConfig",
    "build_model",
    "bug018_sample",
    "TrainConfig",
    "train_and_evaluate",
    "summarize",
    "paired_differences",
    "to_dataframe",
    "load_published",
]
