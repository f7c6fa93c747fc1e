"""Training and evaluation of one run: a fixed step budget, AdamW, warmup + cosine, final test metric.

Protocol: a validation fold is carved from the training split (:func:`validation_split`); the model
trains on the rest for the whole budget, the validation metric is recorded along the way (the
learning curve, for choosing recipes and for the compute view), and the test split is evaluated
once, after the last step. Nothing is ever selected on the test split.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from .config import RecordedConfig
from .models import ModelConfig, build_model, count_parameters
from .tasks import Split, TaskData

__all__ = [
    "TrainConfig", "train_and_evaluate", "resolve_device", "validation_split", "evaluate", "primary_metric", "step_flops",
    "make_optimizer", "clip_gradients", "Checkpoint",
]

# examples whose fold is drawn by this fixed generator, so every seed and variant share the fold
_FOLD_SEED = 0x5EED


@dataclass(frozen=True)
class TrainConfig(RecordedConfig):
    """Optimisation budget and settings; stored in every result record.

    Args:
        steps: optimizer steps (the budget; runs do not stop early).
        batch_size: training examples per step.
        lr, weight_decay: AdamW settings.
        warmup: linear warmup steps, then cosine decay to zero.
        grad_clip: global gradient norm clip.
        eval_batch_size: test examples per forward pass.
        amp: ``"bf16"`` for bfloat16 autocast on CUDA (ignored on CPU), or ``"none"``.
        validation_folds, validation_fold: fold ``validation_fold`` of ``validation_folds`` equal
            folds of the training split is held out for validation (``validation_folds=0``: none).
        curve_points: validation evaluations along the run (evenly spaced, the last after the
            final step); the learning curve.
        input_noise: standard deviation of Gaussian noise added to continuous inputs while
            training (augmentation; token inputs are left alone).
    """

    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 100
    grad_clip: float = 1.0
    eval_batch_size: int = 256
    amp: str = "none"
    validation_folds: int = 10
    validation_fold: int = 0
    curve_points: int = 10
    input_noise: float = 0.0

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if self.validation_folds < 0 or (self.validation_folds == 1):
            raise ValueError(f"validation_folds: expected 0 (no validation) or at least 2, got {self.validation_folds}")
        if self.validation_folds and not 0 <= self.validation_fold < self.validation_folds:
            raise ValueError(
                f"validation_fold: expected 0 <= fold < validation_folds ({self.validation_folds}), got {self.validation_fold}"
            )
        if self.curve_points < 0:
            raise ValueError(f"curve_points: expected a non-negative integer, got {self.curve_points}")
        if not self.input_noise >= 0:
            raise ValueError(f"input_noise: expected a non-negative standard deviation, got {self.input_noise}")


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when present, else CPU; otherwise the named device (validated)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device: {device!r} requested but CUDA is not available")
    try:
        return torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"--device: expected 'auto', 'cpu' or 'cuda[:i]', got {device!r}") from error


def validation_split(train: Split, folds: int, fold: int) -> tuple[Split, Split | None]:
    """``(training part, validation fold)`` of a training split; ``folds=0``: ``(train, None)``.

    The examples are dealt into ``folds`` folds by a permutation from a fixed generator, so the
    fold is the same for every seed and variant (and for every run of a tuning sweep).
    """
    if folds == 0:
        return train, None
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(_FOLD_SEED))
    held_out = torch.zeros(len(train), dtype=torch.bool)
    held_out[order[fold::folds]] = True

    def part(mask: Tensor) -> Split:
        return Split(train.x[mask], train.y[mask], train.lengths[mask])

    return part(~held_out), part(held_out)


def _batch(split: Split, index: Tensor, device: torch.device) -> tuple[Tensor, Tensor | None, Tensor]:
    """Examples ``index``, trimmed to the longest real length among them; mask None if unpadded."""
    lengths = split.lengths[index]
    width = int(lengths.max())
    x = split.x[index, :width].to(device, non_blocking=True)
    y = split.y[index].to(device, non_blocking=True)
    mask = None
    if bool((lengths < width).any()):
        mask = (torch.arange(width)[None, :] < lengths[:, None]).to(device)
    return x, mask, y


def primary_metric(kind: str) -> tuple[str, bool]:
    """The test metric tables report for a task kind, and whether higher is better."""
    return {
        "classification": ("test_accuracy", True),
        "regression": ("test_mse", False),
        "language_model": ("test_bits_per_char", False),
    }[kind]


def _loss(kind: str, output: Tensor, y: Tensor) -> Tensor:
    if kind == "regression":
        return F.mse_loss(output.float(), y)
    if kind == "language_model":  # (b, n, vocab) against (b, n): every position predicts its next token
        return F.cross_entropy(output.float().flatten(0, 1), y.flatten())
    return F.cross_entropy(output.float(), y)


def _lr_factor(step: int, config: TrainConfig) -> float:
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate(
    model, data: TaskData, split: Split, config: TrainConfig, device: torch.device, autocast, *, prefix: str = "test"
) -> tuple[dict[str, float], list[float]]:
    """Metrics of ``model`` on ``split`` and each example's outcome, in the split's order.

    Returns:
        ``{prefix_accuracy, prefix_loss}`` (classification), ``{prefix_mse}`` (regression) or
        ``{prefix_bits_per_char, prefix_accuracy}`` (language models, over every position), and
        per example: 1.0/0.0 for correct/wrong, the squared error, or the example's mean bits
        per character. The outcomes pair examples across variants and seeds for the
        hierarchical bootstrap.
    """
    was_training = model.training
    model.eval()
    outcomes = torch.zeros(len(split), dtype=torch.float64)
    losses = torch.zeros(len(split), dtype=torch.float64)
    # sort by length so that padded batches stay short; outcomes go back to their examples
    order = torch.argsort(split.lengths, stable=True)
    for start in range(0, len(split), config.eval_batch_size):
        index = order[start : start + config.eval_batch_size]
        x, mask, y = _batch(split, index, device)
        with autocast():
            output = model(x, mask).float()
        if data.kind == "regression":
            squared = (output - y).pow(2).double().cpu()
            outcomes[index], losses[index] = squared, squared
        elif data.kind == "language_model":  # per example: mean bits per character, and accuracy
            nats = F.cross_entropy(output.transpose(1, 2), y, reduction="none").mean(1)  # (b,)
            outcomes[index] = (nats / math.log(2)).double().cpu()
            losses[index] = (output.argmax(-1) == y).double().mean(1).cpu()
        else:
            outcomes[index] = (output.argmax(-1) == y).double().cpu()
            losses[index] = F.cross_entropy(output, y, reduction="none").double().cpu()
    model.train(was_training)
    if data.kind == "regression":
        return {f"{prefix}_mse": float(losses.mean())}, outcomes.tolist()
    if data.kind == "language_model":  # windows have equal lengths, so means of means are means
        return {f"{prefix}_bits_per_char": float(outcomes.mean()), f"{prefix}_accuracy": float(losses.mean())}, outcomes.tolist()
    return {f"{prefix}_accuracy": float(outcomes.mean()), f"{prefix}_loss": float(losses.mean())}, outcomes.tolist()


def _cpu_attention_flops(query, key, value, *args, out_val=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


# The counter knows the CUDA attention kernels but not the fused CPU one that full attention runs;
# count it with the same formulas, so every variant's attention is counted on every device.
_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
}


def _training_flops(model, data: TaskData, train: Split, config: TrainConfig, device: torch.device, autocast) -> float:
    """Estimated FLOPs of the whole training run: a counted step, times the steps.

    One forward + backward pass is counted with :class:`torch.utils.flop_counter.FlopCounterMode`
    (matrix products, convolutions and attention) on each of 4 batches drawn by a generator of
    its own, and the mean is multiplied by ``steps``; elementwise work is not counted. The model's
    weights and gradients are left as they were.
    """
    generator = torch.Generator().manual_seed(_FOLD_SEED)
    counts = []
    for _ in range(4):
        index = torch.randperm(len(train), generator=generator)[: config.batch_size]
        x, mask, y = _batch(train, index, device)
        counter = FlopCounterMode(display=False, custom_mapping=_ATTENTION_FLOPS)
        with counter:
            with autocast():
                output = model(x, mask)
            _loss(data.kind, output, y).backward()
        counts.append(counter.get_total_flops())
    model.zero_grad(set_to_none=True)
    return float(sum(counts) / len(counts) * config.steps)


def _model_for(data: TaskData, model_config: ModelConfig):
    """A fresh model for ``data``: its outputs, its input kind, and a per-token head for language models."""
    return build_model(
        model_config,
        num_outputs=1 if data.kind == "regression" else data.num_classes,
        vocab_size=data.vocab_size,
        in_channels=data.in_channels,
        per_token=data.kind == "language_model",
    )


def step_flops(data: TaskData, model_config: ModelConfig, train_config: TrainConfig) -> float:
    """Estimated FLOPs of one training step of ``model_config`` on ``data`` (see :func:`_training_flops`).

    Builds the model from seed 0 on the CPU and counts one step; what compute-matched presets
    divide a FLOP budget by to get each variant's number of steps.
    """
    train, _ = validation_split(data.train, train_config.validation_folds, train_config.validation_fold)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _model_for(data, model_config)
        one_step = TrainConfig.from_dict({**train_config.to_dict(), "steps": 1})
        return _training_flops(model.train(), data, train, one_step, torch.device("cpu"), contextlib.nullcontext)


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with the recipe's learning rate and weight decay, the update of every published record.

    The multi-tensor update (``foreach=True``, a few calls per step instead of about ten tensor
    operations per parameter) gives bit for bit the parameters of torch's per-parameter loop, which
    trained the main comparison. torch's fused CPU update follows the same rule to about 1e-7 per
    step, and the ablation models amplify such differences within a few hundred steps, so records
    from it would not pair step for step with the others. (It also leaves the parameters' version
    counters alone, which once kept the position bias's inference table stale through every
    evaluation after the first; the table now compares the weights' values.)
    """
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, foreach=True)


def clip_gradients(parameters, max_norm: float) -> Tensor:
    r"""Scale the gradients so that their global L2 norm is at most ``max_norm`` (c); returns the norm.

    .. math:: g \leftarrow g \cdot \min\left(1, \frac{c}{\lVert g \rVert_2 + 10^{-6}}\right)

    ``torch.nn.utils.clip_grad_norm_``'s rule, in three tensor operations for all gradients
    (its multi-tensor path is CUDA-only, and its loop costs two per parameter on the CPU).
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, (max_norm / (total + 1e-6)).clamp(max=1.0))
    return total


def _add_noise(x: Tensor, mask: Tensor | None, std: float, generator: torch.Generator) -> Tensor:
    """Gaussian noise on continuous inputs (augmentation), none on padding; token ids untouched."""
    if std == 0 or not x.is_floating_point():
        return x
    noise = torch.randn(x.shape, generator=generator).to(x.device, x.dtype) * std
    if mask is not None:
        noise = noise * mask[..., None].to(x.dtype)
    return x + noise


@dataclass(frozen=True)
class Checkpoint:
    """Where a run keeps its training state while it trains, so that a killed run resumes.

    Every ``every_s`` wall seconds (``0``: after every step) the run writes everything its next
    steps depend on: weights, optimizer and schedule, the random states (initialisation is done,
    but dropout, batch order and noise still draw), the epoch's batch order, the losses and
    learning curve so far, and its clocks. A run given a file that holds a state with the same
    ``identity`` goes on from that step and ends with the same weights, metrics and curve as a run
    never interrupted (on the same device and torch); a state of another identity is ignored.

    Args:
        path: the file; written whole or not at all (a new file replaces the old one). The caller
            removes it once the run's record is written.
        every_s: wall seconds between saves.
        identity: what a saved state must match to be resumed, e.g. the run's key, config hash,
            commit, torch version and device.
    """

    path: Path
    every_s: float = 60.0
    identity: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))
        # plain JSON values, which a weights-only load reads back (torch.__version__ is a str subclass it refuses)
        try:
            object.__setattr__(self, "identity", json.loads(json.dumps(self.identity)))
        except TypeError as error:
            raise ValueError(
                f"identity: expected JSON values (str, int, float, bool, None, list, dict): {error}"
            ) from None
        if not self.every_s >= 0:
            raise ValueError(f"every_s: expected a non-negative number of seconds, got {self.every_s!r}")


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a reader finds the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def _load_checkpoint(checkpoint: Checkpoint | None) -> dict[str, Any] | None:
    """The saved state of ``checkpoint`` if there is one of its identity, else None."""
    if checkpoint is None or not checkpoint.path.is_file():
        return None
    try:
        state = torch.load(checkpoint.path, map_location="cpu", weights_only=True)
    except Exception as error:  # a file that cannot be read is not worth losing a run over
        print(f"checkpoint: {checkpoint.path} cannot be read ({error}); training from step 0", file=sys.stderr)
        return None
    if state.get("identity") != checkpoint.identity:
        print(f"checkpoint: {checkpoint.path} holds another run ({state.get('identity')}, expected "
              f"{checkpoint.identity}); training from step 0", file=sys.stderr)
        return None
    return state


def train_and_evaluate(
    data: TaskData,
    model_config: ModelConfig,
    train_config: TrainConfig,
    *,
    seed: int,
    device: torch.device,
    progress: bool = False,
    checkpoint: Checkpoint | None = None,
) -> dict[str, Any]:
    """Train a fresh model on ``data`` and return its metrics and bookkeeping.

    ``seed`` fixes the initialisation (``torch.manual_seed``), the batch order and the
    augmentation noise (generators of their own), so a run is reproducible on the same device
    and torch version. With a ``checkpoint`` the run saves its state as it trains and, if the
    file already holds a state of the same run, goes on from there (:class:`Checkpoint`).

    Returns:
        A dict with ``metrics`` (test metrics after the last step and ``final_train_loss``),
        ``validation`` (validation metrics after the last step, empty without validation),
        ``learning_curve`` (``[{"step", "train_loss", "cpu_s", "wall_s", <validation metrics>}]``),
        ``test_outcomes`` (per test example, in the split's order), ``finite``, ``params``,
        ``train_time_s``, ``train_cpu_s``, ``eval_time_s``, ``train_flops``, ``num_train``,
        ``num_validation``, ``amp_used``, ``resumed_from_step`` (0 for a run trained in one go) and
        ``earlier_wall_s``, ``earlier_cpu_s``: the time this function spent in earlier processes up
        to the state it resumed from (0.0 without one), which ``train_time_s`` and ``train_cpu_s``
        include for the training steps.
    """
    train, validation = validation_split(data.train, train_config.validation_folds, train_config.validation_fold)
    torch.manual_seed(seed)
    model = _model_for(data, model_config).to(device)
    optimizer = make_optimizer(model, train_config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, train_config))
    order_generator = torch.Generator().manual_seed(seed)
    noise_generator = torch.Generator().manual_seed(seed + 1)
    use_amp = train_config.amp == "bf16" and device.type == "cuda"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()

    entry_wall, entry_cpu = time.perf_counter(), time.process_time()
    model.train()
    saved = _load_checkpoint(checkpoint)
    if saved is None:
        # counting draws no randomness of the run
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            train_flops = _training_flops(model, data, train, train_config, device, autocast)
        first_step, earlier_wall, earlier_cpu = 0, 0.0, 0.0
    else:
        train_flops, first_step = saved["train_flops"], saved["step"]
        earlier_wall, earlier_cpu = saved["run_wall_s"], saved["run_cpu_s"]

    steps = train_config.steps
    points = min(train_config.curve_points, steps) if validation is not None else 0
    curve_steps = {round((point + 1) * steps / points) for point in range(points)}
    permutation, cursor = torch.randperm(len(train), generator=order_generator), 0
    losses: list[float] = []
    curve: list[dict[str, float]] = []
    train_time = train_cpu = 0.0
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(saved["cuda_rng"], device)
        order_generator.set_state(saved["order_generator"])
        noise_generator.set_state(saved["noise_generator"])
        permutation, cursor = saved["permutation"], saved["cursor"]
        losses, curve = list(saved["losses"]), list(saved["curve"])
        train_time, train_cpu = saved["train_time"], saved["train_cpu"]

    def save(next_step: int) -> None:
        _save_checkpoint(checkpoint.path, {
            "identity": checkpoint.identity, "step": next_step, "train_flops": train_flops,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "order_generator": order_generator.get_state(), "noise_generator": noise_generator.get_state(),
            "permutation": permutation, "cursor": cursor, "losses": losses, "curve": curve,
            "train_time": train_time, "train_cpu": train_cpu,
            "run_wall_s": earlier_wall + time.perf_counter() - entry_wall,
            "run_cpu_s": earlier_cpu + time.process_time() - entry_cpu,
        })

    iterator = range(first_step, steps)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="steps", leave=False, mininterval=2.0)
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    last_save = wall_start
    for step in iterator:
        if cursor + train_config.batch_size > len(permutation):  # a new epoch: a new order
            permutation, cursor = torch.randperm(len(train), generator=order_generator), 0
        index = permutation[cursor : cursor + train_config.batch_size]
        cursor += train_config.batch_size
        x, mask, y = _batch(train, index, device)
        x = _add_noise(x, mask, train_config.input_noise, noise_generator)
        with autocast():
            output = model(x, mask)
        loss = _loss(data.kind, output, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(model.parameters(), train_config.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        evaluate_now = step + 1 in curve_steps
        save_now = (checkpoint is not None and step + 1 < steps
                    and time.perf_counter() - last_save >= checkpoint.every_s)
        if evaluate_now or save_now:  # the clocks stop while validating or writing the state
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_time += time.perf_counter() - wall_start
            train_cpu += time.process_time() - cpu_start
            if evaluate_now:
                metrics, _ = evaluate(model, data, validation, train_config, device, autocast, prefix="validation")
                recent = losses[-max(1, steps // max(points, 1)) :]
                curve.append({"step": step + 1, "train_loss": sum(recent) / len(recent), "cpu_s": train_cpu,
                              "wall_s": train_time, **metrics})
            if save_now:
                save(step + 1)
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            if save_now:
                last_save = wall_start
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_time += time.perf_counter() - wall_start
    train_cpu += time.process_time() - cpu_start

    start = time.perf_counter()
    metrics, test_outcomes = evaluate(model, data, data.test, train_config, device, autocast)
    eval_time = time.perf_counter() - start
    tail = losses[-max(1, len(losses) // 10) :]
    metrics["final_train_loss"] = sum(tail) / len(tail)
    validation_metrics = {key: value for key, value in curve[-1].items() if key.startswith("validation_")} if curve else {}
    finite = all(math.isfinite(v) for v in (*metrics.values(), *validation_metrics.values()))
    return {
        "metrics": metrics,
        "validation": validation_metrics,
        "learning_curve": curve,
        "test_outcomes": test_outcomes,
        "finite": finite,
        "params": count_parameters(model),
        "train_time_s": train_time,
        "train_cpu_s": train_cpu,
        "eval_time_s": eval_time,
        "train_flops": train_flops,
        "num_train": len(train),
        "num_validation": 0 if validation is None else len(validation),
        "amp_used": "bf16" if use_amp else "none",
        "resumed_from_step": first_step,
        "earlier_wall_s": earlier_wall,
        "earlier_cpu_s": earlier_cpu,
    }
