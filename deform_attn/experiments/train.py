"""Training and evaluation of one run: a fixed step budget, AdamW, warmup + cosine, final test metric."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import RecordedConfig
from .models import ModelConfig, build_model, count_parameters
from .tasks import Split, TaskData

__all__ = ["TrainConfig", "train_and_evaluate", "resolve_device"]


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
    """

    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 100
    grad_clip: float = 1.0
    eval_batch_size: int = 256
    amp: str = "none"


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


def _loss(kind: str, output: Tensor, y: Tensor) -> Tensor:
    return F.mse_loss(output.float(), y) if kind == "regression" else F.cross_entropy(output.float(), y)


def _lr_factor(step: int, config: TrainConfig) -> float:
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate(model, data: TaskData, split: Split, config: TrainConfig, device: torch.device, autocast) -> dict[str, float]:
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    # sort by length so that padded batches stay short; metrics do not depend on the order
    order = torch.argsort(split.lengths, stable=True)
    for start in range(0, len(split), config.eval_batch_size):
        x, mask, y = _batch(split, order[start : start + config.eval_batch_size], device)
        with autocast():
            output = model(x, mask)
        total_loss += float(_loss(data.kind, output, y)) * y.shape[0]
        if data.kind == "classification":
            correct += int((output.argmax(-1) == y).sum())
        count += y.shape[0]
    if data.kind == "regression":
        return {"test_mse": total_loss / count}
    return {"test_accuracy": correct / count, "test_loss": total_loss / count}


def train_and_evaluate(
    data: TaskData,
    model_config: ModelConfig,
    train_config: TrainConfig,
    *,
    seed: int,
    device: torch.device,
    progress: bool = False,
) -> dict[str, Any]:
    """Train a fresh model on ``data`` and return its metrics and bookkeeping.

    ``seed`` fixes the initialisation (``torch.manual_seed``) and the batch order (a separate
    generator), so a run is reproducible on the same device and torch version.
    """
    torch.manual_seed(seed)
    model = build_model(
        model_config,
        num_outputs=1 if data.kind == "regression" else data.num_classes,
        vocab_size=data.vocab_size,
        in_channels=data.in_channels,
    ).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_config.lr, weight_decay=train_config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, train_config))
    order_generator = torch.Generator().manual_seed(seed)
    use_amp = train_config.amp == "bf16" and device.type == "cuda"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()

    permutation, cursor = torch.randperm(len(data.train), generator=order_generator), 0
    losses: list[float] = []
    iterator = range(train_config.steps)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="steps", leave=False, mininterval=2.0)
    model.train()
    start = time.perf_counter()
    for step in iterator:
        if cursor + train_config.batch_size > len(permutation):  # a new epoch: a new order
            permutation, cursor = torch.randperm(len(data.train), generator=order_generator), 0
        index = permutation[cursor : cursor + train_config.batch_size]
        cursor += train_config.batch_size
        x, mask, y = _batch(data.train, index, device)
        with autocast():
            output = model(x, mask)
        loss = _loss(data.kind, output, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_time = time.perf_counter() - start

    start = time.perf_counter()
    metrics = evaluate(model, data, data.test, train_config, device, autocast)
    eval_time = time.perf_counter() - start
    tail = losses[-max(1, len(losses) // 10) :]
    metrics["final_train_loss"] = sum(tail) / len(tail)
    finite = all(math.isfinite(v) for v in metrics.values())
    return {
        "metrics": metrics,
        "finite": finite,
        "params": count_parameters(model),
        "train_time_s": train_time,
        "eval_time_s": eval_time,
        "amp_used": "bf16" if use_amp else "none",
    }
