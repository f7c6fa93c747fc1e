"""Benchmark tasks for the ablations: generated (adding problem, ListOps) and shipped (MNIST-1D, OSULeaf).

Every task is offline and deterministic: a generator seeded by the run's seed, or data that an
installed package ships (``mnist1d`` generates its data set; ``aeon`` ships the OSULeaf files).
Nothing is downloaded at run time.

Every task is registered in :data:`TASKS` by :func:`register_task`, with its kind and its default
training budget, so a new task is one function returning :class:`TaskData` and one decorator::

    @register_task("copy", kind="classification", default_train={"steps": 200, "batch_size": 16})
    def copy_task(*, length: int = 64, seed: int = 0) -> TaskData: ...

:func:`make_task` looks tasks up by name; a preset (:data:`deform_attn.experiments.grid.PRESETS`)
that gives a task no ``train`` budget (or no ``params``) takes the registered defaults.

Layout of every split: ``x`` is (examples, n) int64 token ids (0 = padding) for token tasks or
(examples, n, channels) float32 for continuous tasks; ``lengths`` (examples,) counts the real tokens
(padding sits at the end); ``y`` is int64 class ids or float32 regression targets.

Which seeds control what:

* ``adding`` and ``listops``: the seed draws the training and test sets.
* ``mnist1d`` and ``osuleaf``: the data set is the published one (MNIST-1D's default arguments,
  seed 42; the UCR train/test split), so numbers stay comparable with the literature. The seed
  controls the model's initialisation and the batch order only (and, for ``mnist1d_long``, where
  each example sits in its longer frame).
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from .config import check_new_name

__all__ = [
    "Split",
    "TaskData",
    "TaskSpec",
    "TASKS",
    "TASK_KINDS",
    "register_task",
    "make_task",
    "adding_problem",
    "listops",
    "listops_generate_tree",
    "listops_evaluate",
    "LISTOPS_VOCAB",
    "mnist1d",
    "osuleaf",
    "osuleaf_path",
    "text",
    "help_text",
    "TEXT_ALPHABET",
]


@dataclass
class Split:
    """One split of a task. Shapes in the module docstring."""

    x: Tensor
    y: Tensor
    lengths: Tensor

    def __len__(self) -> int:
        return self.y.shape[0]


@dataclass
class TaskData:
    """A task's data and what a model needs to know about it.

    Attributes:
        name: task name as in :data:`TASKS`.
        kind: ``"classification"`` or ``"regression"``.
        train, test: the two splits (no validation split: every run trains for a fixed budget and
            reports the test metric after the last step, so nothing is selected on the test set).
        num_classes: classes (classification) or 1 (regression).
        vocab_size: number of token ids including padding 0, for token tasks; ``None`` otherwise.
        in_channels: input channels for continuous tasks; ``None`` for token tasks.
        baseline: the trivial predictor's test metric: majority-class accuracy, or the MSE of
            predicting the training mean.
        reference: published numbers on this task, for context in tables.
    """

    name: str
    kind: str
    train: Split
    test: Split
    num_classes: int
    vocab_size: int | None = None
    in_channels: int | None = None
    baseline: dict[str, float] = field(default_factory=dict)
    reference: dict[str, float] = field(default_factory=dict)

    @property
    def max_length(self) -> int:
        return int(max(self.train.x.shape[1], self.test.x.shape[1]))


def _trivial_baseline(kind: str, y_train: Tensor, y_test: Tensor) -> dict[str, float]:
    if kind == "regression":
        return {"test_mse": float(((y_test - y_train.mean()) ** 2).mean())}
    majority = torch.bincount(y_train).argmax()
    return {"test_accuracy": float((y_test == majority).float().mean())}


# ---------------------------------------------------------------------------- the registry

TASK_KINDS: tuple[str, ...] = ("classification", "regression", "language_model")
TaskBuilder = Callable[..., TaskData]


@dataclass(frozen=True)
class TaskSpec:
    """A registered task.

    Attributes:
        name: the task's name in presets and records.
        build: keyword parameters and ``seed`` -> :class:`TaskData`.
        kind: ``"classification"`` or ``"regression"``; the built data must agree.
        default_train: :class:`deform_attn.experiments.train.TrainConfig` arguments for a preset
            that gives this task none (the budget the ``cpu`` preset uses).
        default_params: keyword parameters for a preset that gives none.
    """

    name: str
    build: TaskBuilder
    kind: str
    default_train: dict[str, Any]
    default_params: dict[str, Any] = field(default_factory=dict)


TASKS: dict[str, TaskSpec] = {}


def register_task(
    name: str,
    *,
    kind: str,
    default_train: dict[str, Any],
    default_params: dict[str, Any] | None = None,
) -> Callable[[TaskBuilder], TaskBuilder]:
    """Decorator: register the function it wraps as task ``name``.

    The function takes keyword parameters and ``seed`` and returns :class:`TaskData`. Stacking the
    decorator registers one function under several names (``mnist1d`` and ``mnist1d_long``).

    Args:
        name: a new task name (a registered name is refused).
        kind: ``"classification"`` or ``"regression"``.
        default_train: the default training budget (``TrainConfig`` keyword arguments).
        default_params: the default task parameters (default: none, the function's own defaults).

    Returns:
        The decorator; it returns the function unchanged.
    """
    check_new_name(name, TASKS, "task", "adding")
    if kind not in TASK_KINDS:
        raise ValueError(f"kind: expected one of {TASK_KINDS}, got {kind!r}")
    if not isinstance(default_train, dict):
        raise ValueError(f"default_train: expected a dict of TrainConfig arguments, got {default_train!r}")

    def register(build: TaskBuilder) -> TaskBuilder:
        TASKS[name] = TaskSpec(name, build, kind, dict(default_train), dict(default_params or {}))
        return build

    return register


def make_task(name: str, params: dict[str, Any] | None, seed: int) -> TaskData:
    """Build task ``name`` with keyword ``params`` (``None``: its registered defaults) for ``seed``."""
    if name not in TASKS:
        raise ValueError(f"task: expected one of {sorted(TASKS)}, got {name!r}")
    spec = TASKS[name]
    data = spec.build(**(spec.default_params if params is None else params), seed=seed)
    if data.kind != spec.kind:
        raise RuntimeError(f"task {name!r}: registered as {spec.kind}, but its data is {data.kind}")
    data.name = name
    return data


# ---------------------------------------------------------------------------- adding problem


# 300 steps left every variant at the trivial MSE on 200 tokens: the adding problem needs a longer budget
@register_task("adding", kind="regression", default_train={"steps": 1000, "batch_size": 16, "warmup": 100})
def adding_problem(*, length: int = 200, num_train: int = 10_000, num_test: int = 2_000, seed: int = 0) -> TaskData:
    """The adding problem (Hochreiter & Schmidhuber 1997): sum the two marked values.

    Channel 0 holds values uniform in [0, 1); channel 1 marks one position in the first half and one
    in the second half of the sequence. The target is the sum of the two marked values; predicting
    its mean 1 scores MSE = Var(a + b) = 2/12 ~= 0.167, the trivial baseline.
    """
    if length < 2:
        raise ValueError(f"length: expected at least 2 tokens, got {length}")
    rng = np.random.default_rng([seed, 0xADD])

    def draw(count: int) -> Split:
        values = rng.random((count, length))
        half = length // 2
        first = rng.integers(0, half, count)
        second = rng.integers(half, length, count)
        marker = np.zeros((count, length))
        rows = np.arange(count)
        marker[rows, first] = 1.0
        marker[rows, second] = 1.0
        x = np.stack([values, marker], axis=-1).astype(np.float32)
        y = (values[rows, first] + values[rows, second]).astype(np.float32)
        return Split(torch.from_numpy(x), torch.from_numpy(y), torch.full((count,), length))

    train, test = draw(num_train), draw(num_test)
    return TaskData(
        name="adding",
        kind="regression",
        train=train,
        test=test,
        num_classes=1,
        in_channels=2,
        baseline=_trivial_baseline("regression", train.y, test.y),
        reference={"trivial_mse_theory": 2 / 12},
    )


# ---------------------------------------------------------------------------- ListOps

# Long Range Arena's ListOps (Nangia & Bowman 2018; Tay et al. 2021): nested lists of single digits
# under MIN, MAX, MED (median, rounded down) and SM (sum modulo 10); 2..10 arguments per operator,
# depth <= 10; a leaf is chosen with probability 0.75 below the depth limit; the answer is a digit.
LISTOPS_OPERATORS: tuple[str, ...] = ("[MIN", "[MAX", "[MED", "[SM")
LISTOPS_CLOSE = "]"
LISTOPS_VOCAB: dict[str, int] = {
    **{str(d): 1 + d for d in range(10)},
    **{op: 11 + i for i, op in enumerate(LISTOPS_OPERATORS)},
    LISTOPS_CLOSE: 15,
}  # 0 is padding
_LEAF_PROBABILITY = 0.75


class _TooLong(Exception):
    pass


def listops_generate_tree(
    rng: random.Random, *, max_depth: int = 10, max_args: int = 10, max_length: int | None = None
) -> list[str]:
    """One random ListOps expression as a list of tokens (an operator token opens a list).

    The root is always an operator. Raises ``ValueError`` if a tree would exceed ``max_length``
    tokens; the generation stops there, which rejects exactly the trees that are too long.
    """
    tokens: list[str] = []

    def grow(depth: int) -> None:
        if max_length is not None and len(tokens) >= max_length:
            raise _TooLong
        if depth > 1 and (depth >= max_depth or rng.random() < _LEAF_PROBABILITY):
            tokens.append(str(rng.randrange(10)))
            return
        tokens.append(rng.choice(LISTOPS_OPERATORS))
        for _ in range(rng.randint(2, max_args)):
            grow(depth + 1)
        tokens.append(LISTOPS_CLOSE)

    try:
        grow(1)
    except _TooLong:
        raise ValueError("tree longer than max_length") from None
    if max_length is not None and len(tokens) > max_length:
        raise ValueError("tree longer than max_length")
    return tokens


def listops_evaluate(tokens: list[str]) -> int:
    """The value (a digit) of a ListOps expression given as tokens, e.g. ``["[MAX", "2", "9", "]"]``."""
    stack: list[tuple[str, list[int]]] = []
    result: int | None = None
    for token in tokens:
        if token in LISTOPS_OPERATORS:
            stack.append((token, []))
        elif token == LISTOPS_CLOSE:
            if not stack:
                raise ValueError("unbalanced ']'")
            op, args = stack.pop()
            if not args:
                raise ValueError(f"{op} without arguments")
            if op == "[MIN":
                value = min(args)
            elif op == "[MAX":
                value = max(args)
            elif op == "[MED":
                value = int(np.floor(np.median(args)))
            else:
                value = sum(args) % 10
            if stack:
                stack[-1][1].append(value)
            else:
                result = value
        elif token.isdigit() and len(token) == 1:
            if not stack:
                if len(tokens) == 1:
                    return int(token)
                raise ValueError("digit outside a list")
            stack[-1][1].append(int(token))
        else:
            raise ValueError(f"unknown ListOps token {token!r}")
    if stack or result is None:
        raise ValueError("unbalanced expression")
    return result


@register_task("listops", kind="classification", default_train={"steps": 300, "batch_size": 16, "warmup": 30})
def listops(
    *,
    min_length: int = 500,
    max_length: int = 2000,
    num_train: int = 96_000,
    num_test: int = 2_000,
    max_depth: int = 10,
    max_args: int = 10,
    seed: int = 0,
) -> TaskData:
    """ListOps with LRA's rules: expressions of ``min_length < tokens < max_length``, 10 classes.

    Expressions are drawn until enough distinct ones are found; train and test share none.
    LRA's full setting is lengths 500..2000 with 96k training examples; its Transformer reached
    36.4% test accuracy.
    """
    rng = random.Random(f"listops-{seed}")
    wanted = num_train + num_test
    seen: set[tuple[str, ...]] = set()
    examples: list[list[str]] = []
    attempts = 0
    while len(examples) < wanted:
        attempts += 1
        if attempts > 200 * wanted + 10_000:
            raise RuntimeError(f"listops: could not draw {wanted} expressions of length ({min_length}, {max_length})")
        try:
            tokens = listops_generate_tree(rng, max_depth=max_depth, max_args=max_args, max_length=max_length - 1)
        except ValueError:
            continue
        if len(tokens) <= min_length:
            continue
        key = tuple(tokens)
        if key in seen:
            continue
        seen.add(key)
        examples.append(tokens)

    def encode(batch: list[list[str]]) -> Split:
        width = max(len(t) for t in batch)
        x = torch.zeros(len(batch), width, dtype=torch.long)
        for i, tokens in enumerate(batch):
            x[i, : len(tokens)] = torch.tensor([LISTOPS_VOCAB[t] for t in tokens])
        y = torch.tensor([listops_evaluate(t) for t in batch], dtype=torch.long)
        lengths = torch.tensor([len(t) for t in batch])
        return Split(x, y, lengths)

    train, test = encode(examples[:num_train]), encode(examples[num_train:])
    return TaskData(
        name="listops",
        kind="classification",
        train=train,
        test=test,
        num_classes=10,
        vocab_size=len(LISTOPS_VOCAB) + 1,
        baseline=_trivial_baseline("classification", train.y, test.y),
        reference={"lra_transformer_accuracy": 0.364},
    )


# ---------------------------------------------------------------------------- MNIST-1D


@functools.lru_cache(maxsize=1)
def _mnist1d_published() -> dict[str, np.ndarray]:
    """The default MNIST-1D data set (generated once per process; callers must not modify it)."""
    from mnist1d.data import get_dataset_args, make_dataset

    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    return {k: data[k] for k in ("x", "y", "x_test", "y_test")}


@register_task(
    "mnist1d_long",
    kind="classification",
    default_train={"steps": 300, "batch_size": 16, "warmup": 30},
    default_params={"upsample": 2, "frame": 160},
)
@register_task("mnist1d_x64", kind="classification", default_train={"steps": 300, "batch_size": 16, "warmup": 30},
               default_params={"upsample": 64, "frame": 2560})
@register_task("mnist1d_x16", kind="classification", default_train={"steps": 300, "batch_size": 16, "warmup": 30},
               default_params={"upsample": 16, "frame": 640})
@register_task("mnist1d_x4", kind="classification", default_train={"steps": 300, "batch_size": 16, "warmup": 30},
               default_params={"upsample": 4, "frame": 160})
@register_task("mnist1d", kind="classification", default_train={"steps": 500, "batch_size": 32, "warmup": 50})
def mnist1d(*, upsample: int = 1, frame: int | None = None, seed: int = 0) -> TaskData:
    """MNIST-1D (Greydanus 2020), generated by the ``mnist1d`` package with its default arguments.

    4000 training and 1000 test sequences of length 40, 10 classes; published test accuracy: CNN
    94%, GRU 91%. Generated with ``make_dataset(get_dataset_args())``, never ``get_dataset`` (which
    downloads). The generator reseeds numpy's and Python's global random state; both are restored.

    The longer-sequence variant stretches each sequence ``upsample`` times by linear interpolation
    and, if ``frame`` is given, places it at a random position (drawn from ``seed``) inside a
    zero-padded frame of ``frame`` tokens, so a model must also find where the digit is.
    """
    if upsample < 1:
        raise ValueError(f"upsample: expected a positive integer, got {upsample}")
    data = _mnist1d_published()
    rng = np.random.default_rng([seed, 0x1D])

    def build(x: np.ndarray, y: np.ndarray) -> Split:
        x = x.astype(np.float32)  # a copy: the cached data set stays untouched
        length = x.shape[1]
        if upsample > 1:
            fine = np.linspace(0, length - 1, length * upsample)
            x = np.stack([np.interp(fine, np.arange(length), row) for row in x]).astype(np.float32)
        if frame is not None:
            if frame < x.shape[1]:
                raise ValueError(f"frame: expected at least {x.shape[1]} tokens, got {frame}")
            framed = np.zeros((x.shape[0], frame), dtype=np.float32)
            starts = rng.integers(0, frame - x.shape[1] + 1, x.shape[0])
            for i, start in enumerate(starts):
                framed[i, start : start + x.shape[1]] = x[i]
            x = framed
        x_t = torch.from_numpy(np.ascontiguousarray(x))[..., None]
        return Split(x_t, torch.from_numpy(y.astype(np.int64)), torch.full((x.shape[0],), x.shape[1]))

    train, test = build(data["x"], data["y"]), build(data["x_test"], data["y_test"])
    name = "mnist1d" if upsample == 1 and frame is None else "mnist1d_long"
    return TaskData(
        name=name,
        kind="classification",
        train=train,
        test=test,
        num_classes=10,
        in_channels=1,
        baseline=_trivial_baseline("classification", train.y, test.y),
        reference={"cnn_accuracy": 0.94, "gru_accuracy": 0.91},
    )


# ---------------------------------------------------------------------------- character-level text

# ids: 0 padding, 1 any character outside the alphabet, then tab, newline and printable ASCII
TEXT_ALPHABET = "\t\n" + "".join(chr(code) for code in range(32, 127))


def help_text() -> str:
    """Python's own help topics (``pydoc_data.topics``, shipped with CPython), joined in key order.

    About 460,000 characters of English prose and code examples, installed with every Python, so
    the task needs no download. The text follows the running Python's version; records keep its
    SHA-256 in ``reference`` so runs on different versions can be told apart.
    """
    from pydoc_data.topics import topics

    return "".join(topics[key] for key in sorted(topics))


def _encode_text(text: str) -> np.ndarray:
    index = {character: position + 2 for position, character in enumerate(TEXT_ALPHABET)}
    return np.fromiter((index.get(character, 1) for character in text), dtype=np.int64, count=len(text))


@register_task(
    "text", kind="language_model", default_train={"steps": 2000, "batch_size": 32, "warmup": 100},
    default_params={"length": 256, "num_train": 20_000, "num_test": 160},
)
def text(*, length: int = 256, num_train: int = 20_000, num_test: int = 160, seed: int = 0) -> TaskData:
    """Character-level language modelling of Python's help text (:func:`help_text`).

    The first 90% of the text is for training: ``num_train`` windows of ``length + 1`` characters
    at offsets drawn from ``seed``; the last 10% is for testing: up to ``num_test`` consecutive,
    non-overlapping windows, the same for every seed. A window's input is its first ``length``
    characters and its target the next character at every position, so a causal model predicts
    each character from the ones before it. Metric: bits per character (cross-entropy / ln 2).
    Trivial predictor: the training text's character frequencies (a unigram model).
    """
    import hashlib

    if length < 2:
        raise ValueError(f"length: expected at least 2 characters, got {length}")
    raw = help_text()
    ids = _encode_text(raw)
    boundary = int(len(ids) * 0.9)
    train_ids, test_ids = ids[:boundary], ids[boundary:]
    rng = np.random.default_rng([seed, 0x7E47])
    starts = rng.integers(0, len(train_ids) - length - 1, num_train)
    windows = np.stack([train_ids[start : start + length + 1] for start in starts])
    test_count = min(num_test, (len(test_ids) - 1) // length)
    test_windows = np.stack([test_ids[i * length : i * length + length + 1] for i in range(test_count)])

    def split(rows: np.ndarray) -> Split:
        rows_t = torch.from_numpy(rows)
        return Split(rows_t[:, :-1].contiguous(), rows_t[:, 1:].contiguous(), torch.full((rows.shape[0],), length))

    vocabulary = len(TEXT_ALPHABET) + 2
    frequencies = np.bincount(train_ids, minlength=vocabulary).astype(np.float64) + 1.0  # add-one smoothing
    probabilities = frequencies / frequencies.sum()
    unigram_bits = float(-np.log2(probabilities[test_windows[:, 1:]]).mean())
    return TaskData(
        name="text",
        kind="language_model",
        train=split(windows),
        test=split(test_windows),
        num_classes=vocabulary,
        vocab_size=vocabulary,
        baseline={"test_bits_per_char": unigram_bits},
        reference={"text_sha256_prefix": int(hashlib.sha256(raw.encode()).hexdigest()[:12], 16), "characters": len(raw)},
    )


# ---------------------------------------------------------------------------- OSULeaf


def osuleaf_path(split: str) -> Path:
    """The OSULeaf ``.ts`` file that ``aeon`` ships inside its package (``split``: TRAIN or TEST)."""
    import aeon

    if split not in ("TRAIN", "TEST"):
        raise ValueError(f"split: expected 'TRAIN' or 'TEST', got {split!r}")
    path = Path(aeon.__file__).parent / "datasets" / "data" / "OSULeaf" / f"OSULeaf_{split}.ts"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: this aeon ({aeon.__version__}) does not ship OSULeaf; "
            "install the version pinned by the 'experiments' extra"
        )
    return path


@register_task("osuleaf", kind="classification", default_train={"steps": 150, "batch_size": 16, "warmup": 15})
def osuleaf(*, seed: int = 0) -> TaskData:
    """OSULeaf from the UCR archive: 200 training and 242 test leaf outlines of length 427, 6 classes.

    Read with ``aeon.datasets.load_from_ts_file`` from the file aeon ships (no network code path).
    Published test accuracy: 1-NN DTW 0.612, ROCKET 0.941, InceptionTime 0.942.
    """
    from aeon.datasets import load_from_ts_file

    def read(split: str) -> tuple[np.ndarray, np.ndarray]:
        x, y = load_from_ts_file(str(osuleaf_path(split)))
        return np.asarray(x, dtype=np.float32)[:, 0, :], np.asarray(y)

    x_train, y_train = read("TRAIN")
    x_test, y_test = read("TEST")
    classes = sorted(set(y_train.tolist()) | set(y_test.tolist()), key=lambda c: int(c))
    index = {c: i for i, c in enumerate(classes)}

    def build(x: np.ndarray, y: np.ndarray) -> Split:
        x = (x - x.mean(1, keepdims=True)) / np.maximum(x.std(1, keepdims=True), 1e-8)  # z-normalise, as UCR
        labels = torch.tensor([index[c] for c in y.tolist()], dtype=torch.long)
        return Split(torch.from_numpy(x.astype(np.float32))[..., None], labels, torch.full((x.shape[0],), x.shape[1]))

    train, test = build(x_train, y_train), build(x_test, y_test)
    return TaskData(
        name="osuleaf",
        kind="classification",
        train=train,
        test=test,
        num_classes=len(classes),
        in_channels=1,
        baseline=_trivial_baseline("classification", train.y, test.y),
        reference={"dtw_1nn_accuracy": 0.612, "rocket_accuracy": 0.941, "inceptiontime_accuracy": 0.942},
    )
