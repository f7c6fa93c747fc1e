"""The result record: every field a finished run writes, its type, unit and meaning, in one place.

A record is one line of a results file (:mod:`deform_attn.experiments.records`). The runner builds a
:class:`Record`; :mod:`deform_attn.experiments.results` reads records back through it, so a field is
named here and nowhere else.

Schema versions (the ``schema`` field):

* 1: the records published before the variant registry (``data/*/results.jsonl``). Their
  ``downsampled`` runs count the unused offset network in ``params``, ``offset_kernel_size=None``
  meant ``r + 2``, and ``position_bias=none`` changed the initialisation of later weights.
* 2: adds ``command``, ``candidate``, ``learning_curve``, ``validation_metrics``, ``test_outcomes``,
  ``num_validation``, ``train_cpu_s``, ``train_flops`` and the provenance fields ``cpu_model``,
  ``cpu_count``, ``cuda``, ``platform`` and ``deform_attn``. Reading a schema-1 record fills them
  with ``None`` (or an empty list). From schema 2 a validation fold is carved from the training
  split (``TrainConfig.validation_folds``), so ``num_train`` counts the examples trained on.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

__all__ = ["Record", "SCHEMA_VERSION", "SUPPORTED_SCHEMAS", "ENVIRONMENT_FIELDS", "as_record"]

SCHEMA_VERSION = 2
SUPPORTED_SCHEMAS: tuple[int, ...] = (1, 2)

# the keys of deform_attn.provenance.environment() that a record keeps, under the same names
ENVIRONMENT_FIELDS: tuple[str, ...] = (
    "device", "device_name", "threads", "torch", "python", "git_commit",
    "cpu_model", "cpu_count", "cuda", "platform", "deform_attn",
)


@dataclass(frozen=True, kw_only=True)
class Record:
    """One finished training run.

    What ran:
        schema: the record's schema version (:data:`SCHEMA_VERSION` for new records).
        key: ``task/variant/config-hash/seed`` (see :class:`deform_attn.experiments.grid.Run`).
        preset: the grid preset the run belongs to.
        task, task_kind: the task and ``"classification"`` or ``"regression"``.
        variant: the run's label, e.g. ``deformable`` or ``deformable[offset_scale=2.0]``.
        attention: the registered attention variant (``ModelConfig.attention``).
        axis: the swept axis, or ``None`` for the main comparison.
        overrides: the deformable config fields the sweep changed.
        config_hash, config: the hashed settings: ``{"task_params", "model", "train"}``.
        seed: seeds the data (generated tasks), the initialisation and the batch order.
        shard: ``"i/N"`` if the run was trained by one shard of the grid, else ``None``.
        command: the command line that produced the record (``None`` in schema 1).
        candidate: the candidate recipe of a recipe-search run (``tune`` preset), else ``None``.

    Results:
        primary_metric: the metric tables report (``test_accuracy`` or ``test_mse``).
        higher_is_better: its direction.
        metrics: test metrics after the last step, and ``final_train_loss``.
        finite: whether every metric is finite.
        learning_curve: ``[{"step", "train_loss", "cpu_s", "wall_s", "validation_<metric>"...}]``,
            oldest first: the validation fold's metrics along the run, with the training CPU and
            wall seconds spent up to that step (empty in schema 1).
        validation_metrics: the validation fold's metrics after the last step (``None`` in
            schema 1; empty without a validation fold).
        test_outcomes: each test example's outcome in the test split's order, 1.0/0.0 for
            correct/wrong or the squared error (``None`` in schema 1); pairs examples across
            variants and seeds for the hierarchical bootstrap.
        baseline: the trivial predictor's metric on the test split.
        reference: published numbers on the task.

    Size and cost:
        sequence_length: the longest sequence, tokens.
        num_train, num_validation, num_test: examples trained on, held out for validation, tested.
        params: trainable parameters.
        train_time_s, eval_time_s, run_wall_s: wall-clock seconds of training, of the test pass,
            and of the whole run including building the model.
        run_cpu_s: CPU seconds of the run's process (all threads).
        train_cpu_s: CPU seconds of the training steps alone (``None`` in schema 1).
        train_flops: estimated floating-point operations of training (matrix products,
            convolutions and attention of one counted step, times the steps), ``None`` in schema 1.
        amp: ``"bf16"`` if autocast was used, else ``"none"``.

    Where it ran (:func:`deform_attn.provenance.environment`, same key names):
        device, device_name, threads, torch, python, git_commit (40 hex digits, ``-dirty`` for a
        modified checkout, ``None`` outside git), and from schema 2 cpu_model, cpu_count, cuda,
        platform and deform_attn (the package version).
        finished_at: local time the record was written, ISO 8601.
    """

    schema: int
    key: str
    preset: str | None
    task: str
    task_kind: str
    variant: str
    attention: str
    axis: str | None
    overrides: dict[str, Any]
    config_hash: str
    config: dict[str, Any]
    seed: int
    shard: str | None

    primary_metric: str
    higher_is_better: bool
    metrics: dict[str, float]
    finite: bool
    baseline: dict[str, float]
    reference: dict[str, float]

    sequence_length: int
    num_train: int
    num_test: int
    params: int
    train_time_s: float
    eval_time_s: float
    run_wall_s: float
    run_cpu_s: float
    amp: str

    device: str
    device_name: str | None
    threads: int
    torch: str
    python: str
    git_commit: str | None
    finished_at: str

    # schema 2
    command: str | None = None
    candidate: str | None = None
    learning_curve: list[dict[str, float]] = field(default_factory=list)
    validation_metrics: dict[str, float] | None = None
    test_outcomes: list[float] | None = None
    num_validation: int | None = None
    train_cpu_s: float | None = None
    train_flops: float | None = None
    cpu_model: str | None = None
    cpu_count: int | None = None
    cuda: str | None = None
    platform: str | None = None
    deform_attn: str | None = None

    def metric(self, name: str | None = None) -> float:
        """The value of metric ``name`` (default: the primary metric)."""
        return float(self.metrics[name or self.primary_metric])

    def to_dict(self) -> dict[str, Any]:
        """The record as the JSON object a results file holds."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Record:
        """Read a record of any supported schema; fields newer than its schema take their defaults.

        Raises:
            ValueError: for an unsupported schema, a missing required field or an unknown field.
        """
        if not isinstance(values, dict):
            raise ValueError(f"record: expected a JSON object, got {type(values).__name__}")
        label = values.get("key", "<no key>")
        schema = values.get("schema")
        if schema not in SUPPORTED_SCHEMAS:
            raise ValueError(f"record {label}: schema expected one of {SUPPORTED_SCHEMAS}, got {schema!r}")
        known = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        unknown, missing = sorted(set(values) - known), sorted(required - set(values))
        if unknown or missing:
            raise ValueError(f"record {label}: missing fields {missing}, unknown fields {unknown} (schema {schema})")
        return cls(**values)


def as_record(record: Record | dict[str, Any]) -> Record:
    """``record`` itself, or the :class:`Record` a parsed JSON line describes."""
    return record if isinstance(record, Record) else Record.from_dict(record)
