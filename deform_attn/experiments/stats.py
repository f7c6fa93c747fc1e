"""Statistics for citable ablation numbers: t intervals, paired t tests, Holm, hierarchical bootstrap.

The numbers an ablation table publishes are differences between variants trained on the same seeds
(the same data, initialisation and batch order for a given seed). This module computes them from
plain arrays, and from :class:`deform_attn.experiments.schema.Record` s:

* :func:`t_cdf`, :func:`t_quantile`: Student's t distribution, from the regularized incomplete beta
  function (a continued fraction); no scipy. Relative error below 1e-12 for df <= 1000 and below
  1e-7 up to df = 1e12 (checked against mpmath at 40 digits); df = inf is the normal.
* :func:`mean_t_interval`: mean with the exact ``t(1 - (1 - confidence) / 2, n - 1)`` interval.
* :func:`paired_t_test`: two-sided one-sample t test of paired differences against zero.
* :func:`holm`: Holm-Bonferroni adjusted p-values and reject flags over a family of tests.
* :func:`hierarchical_bootstrap_difference`: a percentile interval that resamples seeds, then test
  examples within each seed (a fixed test set is a sample too), paired across the two variants.
* :func:`paired_comparisons`: variant - reference on the same seed, per (preset, task, variant,
  config), with t interval, p, Holm-adjusted p over the call's family, and the bootstrap interval.
* :func:`baseline_differences`: variant - trivial predictor on the same seed.

Sign convention: every difference is ``variant - reference`` (or ``variant - baseline``) in the
metric's own units, whatever its direction; rows say which sign favours the variant (positive for
an accuracy, negative for an MSE).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Iterable, Sequence

import numpy as np

from .schema import Record, as_record

__all__ = [
    "t_cdf",
    "t_quantile",
    "mean_t_interval",
    "paired_t_test",
    "holm",
    "hierarchical_bootstrap_difference",
    "paired_comparisons",
    "baseline_differences",
]

RecordLike = Record | dict[str, Any]

# ---------------------------------------------------------------------------- Student's t

_EPS = 1e-16
_TINY = 1e-300
_LOG_SQRT_PI = 0.5 * math.log(math.pi)
_LARGE_DF = 1e8  # beyond: a normal expansion in 1/df (see _t_tail)


def _check_df(df: float) -> float:
    if isinstance(df, bool) or not isinstance(df, (int, float, np.integer, np.floating)):
        raise TypeError(f"df: expected a real number of degrees of freedom, got {type(df).__name__}")
    df = float(df)
    if not df > 0:  # also rejects NaN
        raise ValueError(f"df: expected degrees of freedom > 0 (or math.inf), got {df}")
    return df


def _check_confidence(confidence: float) -> float:
    confidence = float(confidence)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence: expected a level in (0, 1), e.g. 0.95, got {confidence}")
    return confidence


def _log_gamma_ratio_half(a: float) -> float:
    """``lgamma(a + 1/2) - lgamma(a)``; the asymptotic series keeps precision where lgamma is huge."""
    if a < 100.0:
        return math.lgamma(a + 0.5) - math.lgamma(a)
    return 0.5 * math.log(a) - 1 / (8 * a) + 1 / (192 * a**3) - 1 / (640 * a**5) + 17 / (14336 * a**7)


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz); converges fast for x < (a+1)/(a+b+2)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    # about sqrt(max(a, b)) iterations are needed; the cap only guards against a bug
    for m in range(1, 100 + int(50 * math.sqrt(max(a, b)))):
        m2 = 2 * m
        even = m * (b - m) * x / ((qam + m2) * (a + m2))
        odd = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        for numerator in (even, odd):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + numerator / c
            c = c if abs(c) > _TINY else _TINY
            delta = c * d
            h *= delta
        if abs(delta - 1.0) < _EPS:
            return h
    raise RuntimeError(f"incomplete beta: continued fraction did not converge for a={a}, b={b}, x={x}")


def _t_tail(x: float, df: float) -> float:
    """P(T > x) for x >= 0: ``I_z(df/2, 1/2) / 2`` with ``z = df / (df + x^2)``, precise in the tail."""
    if x == 0.0:
        return 0.5
    if math.isinf(x):
        return 0.0
    if df > _LARGE_DF:
        # the continued fraction loses ~df * 1e-16 relative precision (z is within x^2/df of 1);
        # here the first-order expansion is closer: its next term is O(x^7 / df^2)
        normal = 0.5 * math.erfc(x / math.sqrt(2.0))
        if math.isinf(df):
            return normal
        return normal + math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi) * (x**3 + x) / (4.0 * df)
    a, b = 0.5 * df, 0.5
    ratio = x * x / df
    z, one_minus_z = 1.0 / (1.0 + ratio), ratio / (1.0 + ratio)  # no cancellation in 1 - z
    log_beta = _LOG_SQRT_PI - _log_gamma_ratio_half(a)  # ln B(df/2, 1/2)
    log_front = -a * math.log1p(ratio) + b * math.log(one_minus_z) - log_beta
    if z < (a + 1.0) / (a + b + 2.0):
        incomplete = math.exp(log_front) * _beta_continued_fraction(a, b, z) / a
    else:
        incomplete = 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, one_minus_z) / b
    return 0.5 * incomplete


def _t_density(x: float, df: float) -> float:
    if math.isinf(df):
        return math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    log_beta = _LOG_SQRT_PI - _log_gamma_ratio_half(0.5 * df)
    return math.exp(-log_beta - 0.5 * math.log(df) - 0.5 * (df + 1.0) * math.log1p(x * x / df))


def t_cdf(x: float, df: float) -> float:
    """The cumulative distribution function of Student's t, P(T <= x).

    Args:
        x: the point; ``+-inf`` give 1 and 0.
        df: degrees of freedom, any real > 0; ``math.inf`` is the standard normal.

    Returns:
        P(T <= x) as a float. For tail probabilities near 1 prefer ``t_cdf(-x, df)``, which keeps
        full relative precision.

    Raises:
        ValueError: if ``x`` is NaN or ``df`` is not > 0.
    """
    df = _check_df(df)
    x = float(x)
    if math.isnan(x):
        raise ValueError("x: expected a number, got NaN")
    return _t_tail(-x, df) if x <= 0 else 1.0 - _t_tail(x, df)


def _t_tail_inverse(q: float, df: float) -> float:
    """The x >= 0 with P(T > x) = q, for 0 < q < 1/2: Newton on log P(T > x), kept in a bracket."""
    if df == 1.0:  # Cauchy, closed form: cot(pi q), precise for tiny q unlike tan(pi (1/2 - q))
        return 1.0 / math.tan(math.pi * q)
    low, high = 0.0, 1.0
    while _t_tail(high, df) > q:
        low, high = high, 2.0 * high
        if math.isinf(high):
            return math.inf
    x = high
    for _ in range(200):
        tail = _t_tail(x, df)
        if tail > q:
            low = x
        else:
            high = x
        density = _t_density(x, df)
        candidate = x + (math.log(tail) - math.log(q)) * tail / density if tail > 0 and density > 0 else math.nan
        if not low < candidate < high:
            # bisection, geometric while the bracket spans orders of magnitude (heavy tails)
            candidate = math.sqrt(low * high) if low > 0 and high > 4 * low else 0.5 * (low + high)
        if abs(candidate - x) <= 4 * 2.2e-16 * candidate or high - low <= 4 * 2.2e-16 * high:
            return candidate
        x = candidate
    return x


def t_quantile(p: float, df: float) -> float:
    """The quantile function of Student's t: the x with P(T <= x) = p.

    Args:
        p: the probability, strictly between 0 and 1 (0.975 for a two-sided 95% interval).
        df: degrees of freedom, any real > 0 (``n - 1`` for a mean of ``n`` values); ``math.inf``
            is the standard normal.

    Returns:
        The quantile; ``t_quantile(1 - p, df) == -t_quantile(p, df)``.

    Raises:
        ValueError: if ``p`` is not in (0, 1) or ``df`` is not > 0.
    """
    df = _check_df(df)
    p = float(p)
    if not 0.0 < p < 1.0:
        raise ValueError(f"p: expected a probability in (0, 1), got {p}")
    if p == 0.5:
        return 0.0
    return -_t_tail_inverse(p, df) if p < 0.5 else _t_tail_inverse(1.0 - p, df)


# ---------------------------------------------------------------------------- intervals and tests


def _finite_values(values: Iterable[float], name: str) -> np.ndarray:
    array = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence of numbers, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name}: expected finite numbers, got {array[~np.isfinite(array)][:3].tolist()}")
    return array


def mean_t_interval(values: Iterable[float], confidence: float = 0.95) -> dict[str, float]:
    """The mean of ``values`` with its t interval ``mean +- t(1 - (1 - c) / 2, n - 1) * std / sqrt(n)``.

    Args:
        values: independent observations (e.g. one metric per seed, or paired differences).
        confidence: the interval's level, 0.95 by default.

    Returns:
        ``{"mean", "low", "high", "half_width", "std", "n"}``; ``std`` is the sample standard
        deviation (ddof 1). For n < 2 the spread and interval are NaN (and the mean too for n = 0).

    Raises:
        ValueError: if a value is not finite or ``confidence`` is not in (0, 1).
    """
    return _t_interval(_finite_values(values, "values"), _check_confidence(confidence))


def _t_interval(array: np.ndarray, confidence: float) -> dict[str, float]:
    n = int(array.size)
    mean = float(array.mean()) if n else math.nan
    if n < 2:
        return {"mean": mean, "low": math.nan, "high": math.nan, "half_width": math.nan, "std": math.nan, "n": n}
    if array.min() == array.max():  # exactly constant: no rounding residue in the mean or spread
        mean, std = float(array[0]), 0.0
    else:
        std = float(array.std(ddof=1))
    half_width = t_quantile(0.5 + 0.5 * confidence, n - 1) * std / math.sqrt(n)
    low, high = mean - half_width, mean + half_width
    return {"mean": mean, "low": low, "high": high, "half_width": half_width, "std": std, "n": n}


def paired_t_test(differences: Iterable[float], confidence: float = 0.95) -> dict[str, float]:
    """Two-sided paired t test: is the mean of the per-seed differences zero?

    ``t = mean / (std / sqrt(n))`` with ``n - 1`` degrees of freedom, ``p = 2 P(T > |t|)``.

    Args:
        differences: ``variant - reference`` per seed (one value per pair).
        confidence: the level of the returned interval, 0.95 by default.

    Returns:
        ``{"mean", "low", "high", "half_width", "std", "t", "p", "n"}``. For n < 2, ``t`` and
        ``p`` are NaN. When every difference is equal (zero spread), ``t`` is +-inf with p = 0 for
        a non-zero mean, and t = 0 with p = 1 when all differences are zero.

    Raises:
        ValueError: if a difference is not finite or ``confidence`` is not in (0, 1).
    """
    interval = _t_interval(_finite_values(differences, "differences"), _check_confidence(confidence))
    n, mean, std = interval["n"], interval["mean"], interval["std"]
    if n < 2:
        t, p = math.nan, math.nan
    elif std == 0.0:
        t, p = (0.0, 1.0) if mean == 0.0 else (math.copysign(math.inf, mean), 0.0)
    else:
        t = mean / (std / math.sqrt(n))
        p = min(1.0, 2.0 * _t_tail(abs(t), float(n - 1)))
    return {**interval, "t": t, "p": p}


def holm(p_values: Sequence[float], alpha: float = 0.05) -> list[dict[str, Any]]:
    """Holm-Bonferroni step-down correction over one family of tests.

    With the m p-values sorted ascending, ``p_(1) <= ... <= p_(m)``, the adjusted p-value of the
    k-th is ``max_{j <= k} min(1, (m - j + 1) p_(j))``; a hypothesis is rejected when its adjusted
    p-value is at most ``alpha``. This controls the family-wise error rate at ``alpha`` under any
    dependence between the tests.

    Args:
        p_values: the family's p-values, in any order. NaN entries (tests that could not be run,
            e.g. one seed) are not part of the family: they get a NaN adjusted p and no rejection,
            and do not count in m.
        alpha: the family-wise error rate, in (0, 1).

    Returns:
        One ``{"p", "adjusted_p", "reject"}`` per input, in the input's order; adjusted p-values
        are monotone in p and capped at 1.

    Raises:
        ValueError: if a p-value is outside [0, 1] or ``alpha`` is not in (0, 1).
    """
    alpha = float(alpha)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha: expected a family-wise error rate in (0, 1), got {alpha}")
    values = [float(p) for p in p_values]
    bad = [p for p in values if not (math.isnan(p) or 0.0 <= p <= 1.0)]
    if bad:
        raise ValueError(f"p_values: expected probabilities in [0, 1] (or NaN), got {bad[:3]}")
    tested = sorted((i for i, p in enumerate(values) if not math.isnan(p)), key=lambda i: values[i])
    m = len(tested)
    adjusted = [math.nan] * len(values)
    running = 0.0
    for rank, index in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * values[index]))
        adjusted[index] = running
    return [
        {"p": p, "adjusted_p": q, "reject": bool(not math.isnan(q) and q <= alpha)} for p, q in zip(values, adjusted)
    ]


# ---------------------------------------------------------------------------- hierarchical bootstrap

# elements (resamples x seeds x examples, or x distinct values) drawn per chunk: bounds the memory
_CHUNK_ELEMENTS = 1 << 21
# "auto" counts distinct differences when each seed has at most this many (0/1 outcomes give 3)
_MAX_DISTINCT_FOR_COUNTS = 16


def _outcome_matrix(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(
            f"{name}: expected a (seeds, examples) array with at least one of each, got shape {array.shape}"
        )
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name}: expected finite outcomes, found {int((~np.isfinite(array)).sum())} non-finite")
    return array


def hierarchical_bootstrap_difference(
    outcomes_variant: Any,
    outcomes_reference: Any,
    *,
    resamples: int = 10_000,
    seed: int = 0,
    confidence: float = 0.95,
    method: str = "auto",
) -> dict[str, float]:
    """Percentile interval of the mean paired difference, resampling seeds and then test examples.

    Each resample draws ``seeds`` seeds with replacement; within every drawn seed it draws
    ``examples`` test examples with replacement and averages ``variant - reference`` over them;
    the resample's value is the mean over the drawn seeds. The draws are **paired**: within a seed
    the same example indices are drawn for both variants (the difference is taken per example
    first), so what the two variants share -- the seed's data, the hard examples -- cancels, and
    identical outcomes give the interval [0, 0] exactly. With one seed only the test examples are
    resampled and the interval says nothing about seed-to-seed variation.

    Args:
        outcomes_variant: ``(seeds, examples)`` per-example outcomes of the variant: 0/1 correctness
            for classification, squared errors for regression. Row ``i`` is seed ``i``; column
            ``j`` is the same test example in both arrays.
        outcomes_reference: the reference's outcomes, same shape, same seed and example order.
        resamples: number of bootstrap resamples (>= 1).
        seed: seeds the resampling (numpy ``default_rng``); equal inputs give equal intervals.
        confidence: the interval's level, 0.95 by default.
        method: how one seed's examples are resampled, the same distribution either way.
            ``"indices"`` draws example indices (any outcomes); ``"counts"`` draws how often each
            distinct difference value is hit (multinomial), far faster when there are few such
            values (0/1 outcomes give at most 3); ``"auto"`` takes counts when every seed has at
            most 16 distinct differences.

    Returns:
        ``{"mean", "low", "high", "seeds", "examples", "resamples"}``: ``mean`` is the observed
        mean difference (over seeds and examples), ``low`` and ``high`` the percentile interval.

    Raises:
        ValueError: for arrays that are not 2-D, differ in shape, are empty or not finite, for
            ``resamples`` < 1, ``confidence`` outside (0, 1), or an unknown ``method``.
    """
    variant = _outcome_matrix(outcomes_variant, "outcomes_variant")
    reference = _outcome_matrix(outcomes_reference, "outcomes_reference")
    if variant.shape != reference.shape:
        raise ValueError(
            f"outcomes_reference: expected the shape of outcomes_variant {variant.shape} (same seeds, same "
            f"test examples), got {reference.shape}"
        )
    if isinstance(resamples, bool) or not isinstance(resamples, (int, np.integer)) or resamples < 1:
        raise ValueError(f"resamples: expected an integer >= 1, got {resamples!r}")
    confidence = _check_confidence(confidence)
    if method not in ("auto", "indices", "counts"):
        raise ValueError(f"method: expected 'auto', 'indices' or 'counts', got {method!r}")

    differences = variant - reference  # paired per example: one draw of an example moves both
    num_seeds, num_examples = differences.shape
    distinct = [np.unique(row, return_counts=True) for row in differences]
    if method == "auto":
        method = "counts" if max(len(values) for values, _ in distinct) <= _MAX_DISTINCT_FOR_COUNTS else "indices"

    rng = np.random.default_rng(seed)
    estimates = np.empty(resamples)
    if method == "counts":
        width = max(len(values) for values, _ in distinct)
        values = np.zeros((num_seeds, width))
        probabilities = np.zeros((num_seeds, width))
        for row, (row_values, row_counts) in enumerate(distinct):
            values[row, : len(row_values)] = row_values
            probabilities[row, : len(row_values)] = row_counts / num_examples
        chunk = max(1, _CHUNK_ELEMENTS // (num_seeds * width))
        for start in range(0, resamples, chunk):
            size = min(chunk, resamples - start)
            seeds = rng.integers(0, num_seeds, size=(size, num_seeds))
            hits = rng.multinomial(num_examples, probabilities[seeds])  # (size, seeds, width)
            estimates[start : start + size] = (hits * values[seeds]).sum(axis=(1, 2)) / (num_seeds * num_examples)
    else:
        flat = differences.ravel()
        index_type = np.uint16 if num_examples <= np.iinfo(np.uint16).max else np.int64
        chunk = max(1, _CHUNK_ELEMENTS // (num_seeds * num_examples))
        for start in range(0, resamples, chunk):
            size = min(chunk, resamples - start)
            seeds = rng.integers(0, num_seeds, size=(size, num_seeds))
            examples = rng.integers(0, num_examples, size=(size, num_seeds, num_examples), dtype=index_type)
            estimates[start : start + size] = flat[(seeds * num_examples)[..., None] + examples].mean(axis=(1, 2))

    tail = 0.5 * (1.0 - confidence)
    low, high = np.quantile(estimates, [tail, 1.0 - tail])
    return {
        "mean": float(differences.mean()),
        "low": float(low),
        "high": float(high),
        "seeds": num_seeds,
        "examples": num_examples,
        "resamples": int(resamples),
    }


# ---------------------------------------------------------------------------- from records


def _records(records: Iterable[RecordLike]) -> list[Record]:
    return [as_record(record) for record in records]


def _by_seed(records: list[Record], what: str) -> dict[int, Record]:
    by_seed: dict[int, Record] = {}
    for record in records:
        if record.seed in by_seed:
            raise ValueError(
                f"records: {what} has two records for seed {record.seed} ({by_seed[record.seed].key!r} and "
                f"{record.key!r}); deduplicate the results (records.merge_records) first"
            )
        by_seed[record.seed] = record
    return by_seed


def _groups(records: list[Record]) -> dict[tuple, dict[int, Record]]:
    grouped: dict[tuple, list[Record]] = defaultdict(list)
    for record in records:
        grouped[(record.preset, record.task, record.variant, record.config_hash)].append(record)
    ordered = sorted(grouped.items(), key=lambda item: tuple(map(str, item[0])))
    return {key: _by_seed(group, f"(preset, task, variant, config) {key}") for key, group in ordered}


def _direction(higher_is_better: bool, what: str) -> str:
    return f"variant better than {what} when difference {'>' if higher_is_better else '<'} 0"


def _test_fields(test: dict[str, float]) -> dict[str, float]:
    """The paired t test's fields as a table row holds them."""
    return {key: test[key] for key in ("n", "mean", "std", "low", "high", "half_width", "t", "p")}


def paired_comparisons(
    records: Iterable[RecordLike],
    *,
    reference: str,
    metric: str | None = None,
    confidence: float = 0.95,
    alpha: float = 0.05,
    resamples: int = 10_000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Every variant against ``reference`` on the same seeds: t interval, p, Holm p, bootstrap.

    Records are grouped by (preset, task, variant, config hash); a group is paired seed by seed
    with the ``reference`` variant's records of the same preset and task, and only the seeds both
    have count. The difference is ``variant - reference`` in the metric's units whatever the
    metric's direction; ``favours_variant`` says which sign is better for the variant.

    The Holm family is every row this call returns, that is every (preset, task, variant, config)
    contrast against ``reference`` in ``records`` -- main variants and sweep points alike -- whose
    paired t test has a p-value (at least two paired seeds). To correct over a smaller family (one
    task, the main comparison only), pass only those records.

    The bootstrap interval (:func:`hierarchical_bootstrap_difference`, on the primary metric's
    per-example ``test_outcomes``) is filled when every paired record has ``test_outcomes`` of
    one length per seed, there are two or more seeds, and ``metric`` is the primary metric;
    otherwise it is NaN and ``note`` says why.

    Args:
        records: :class:`Record` s or parsed JSON lines.
        reference: the variant every other variant is compared with (e.g. ``"full"``).
        metric: the metric to compare (default: each record's primary metric).
        confidence: level of the t and bootstrap intervals.
        alpha: family-wise error rate for Holm's ``reject``.
        resamples, seed: of the bootstrap.

    Returns:
        One row per contrast: ``preset``, ``task``, ``variant``, ``reference``, ``metric``,
        ``higher_is_better``, ``favours_variant``, ``n``, ``seeds``, ``mean``, ``std``, ``low``,
        ``high``, ``half_width``, ``t``, ``p``, ``p_holm``, ``reject``, ``family_size``,
        ``bootstrap_mean``, ``bootstrap_low``, ``bootstrap_high``, ``note``, ``config_hash``.

    Raises:
        ValueError: if no record is of ``reference``, the reference has two records for one
            (preset, task, seed), a group repeats a seed, or the paired records' ``test_outcomes``
            differ in length within a seed (the examples would not pair).
    """
    confidence = _check_confidence(confidence)
    records = _records(records)
    if not any(r.variant == reference for r in records):
        variants = sorted({r.variant for r in records})
        raise ValueError(f"reference: no records of variant {reference!r}; variants: {variants}")
    references: dict[tuple, list[Record]] = defaultdict(list)
    for record in records:
        if record.variant == reference:
            references[(record.preset, record.task)].append(record)
    reference_by = {key: _by_seed(group, f"reference {reference!r} on {key}") for key, group in references.items()}

    rows = []
    for (preset, task, variant, config_hash), by_seed in _groups(records).items():
        if variant == reference or (preset, task) not in reference_by:
            continue
        reference_seeds = reference_by[(preset, task)]
        seeds = sorted(s for s in by_seed if s in reference_seeds)
        if not seeds:
            continue
        pairs = [(by_seed[s], reference_seeds[s]) for s in seeds]
        first = pairs[0][0]
        name = metric or first.primary_metric
        test = paired_t_test([r.metric(name) - ref.metric(name) for r, ref in pairs], confidence)
        bootstrap, note = _paired_bootstrap(pairs, name, resamples=resamples, seed=seed, confidence=confidence)
        notes = ([] if test["n"] >= 2 else ["fewer than 2 paired seeds: no t interval or p"]) + ([note] if note else [])
        rows.append(
            {
                "preset": preset,
                "task": task,
                "variant": variant,
                "reference": reference,
                "metric": name,
                "higher_is_better": first.higher_is_better,
                "favours_variant": _direction(first.higher_is_better, "reference"),
                "seeds": seeds,
                **_test_fields(test),
                "bootstrap_mean": bootstrap["mean"],
                "bootstrap_low": bootstrap["low"],
                "bootstrap_high": bootstrap["high"],
                "note": "; ".join(notes),
                "config_hash": config_hash,
            }
        )
    corrected = holm([row["p"] for row in rows], alpha=alpha)
    family_size = sum(not math.isnan(row["p"]) for row in rows)
    for row, adjusted in zip(rows, corrected):
        row.update(p_holm=adjusted["adjusted_p"], reject=adjusted["reject"], family_size=family_size)
    return rows


def _paired_bootstrap(
    pairs: list[tuple[Record, Record]], metric: str, *, resamples: int, seed: int, confidence: float
) -> tuple[dict[str, float], str]:
    """The bootstrap of ``pairs`` (variant, reference per seed), or NaNs and the reason."""
    missing = {"mean": math.nan, "low": math.nan, "high": math.nan}
    first = pairs[0][0]
    if metric != first.primary_metric:
        return missing, f"no bootstrap: test_outcomes describe {first.primary_metric}, not {metric}"
    if len(pairs) < 2:
        return missing, "no bootstrap: fewer than 2 paired seeds"
    outcomes = [(getattr(r, "test_outcomes", None), getattr(ref, "test_outcomes", None)) for r, ref in pairs]
    lacking = [
        record.key
        for (r, ref), (o, o_ref) in zip(pairs, outcomes)
        for record, values in ((r, o), (ref, o_ref))
        if values is None or len(values) == 0
    ]
    if lacking:
        return missing, f"no bootstrap: {len(lacking)} paired records lack test_outcomes (e.g. {lacking[0]!r})"
    for (r, ref), (o, o_ref) in zip(pairs, outcomes):
        if len(o) != len(o_ref):
            raise ValueError(
                f"records: test_outcomes of {r.key!r} ({len(o)}) and {ref.key!r} ({len(o_ref)}) differ in length; "
                "the test examples of one seed must pair across variants"
            )
    if len({len(o) for o, _ in outcomes}) > 1:
        return missing, "no bootstrap: test_outcomes differ in length across seeds"
    result = hierarchical_bootstrap_difference(
        [o for o, _ in outcomes], [o for _, o in outcomes], resamples=resamples, seed=seed, confidence=confidence
    )
    return result, ""


def baseline_differences(
    records: Iterable[RecordLike], metric: str | None = None, *, confidence: float = 0.95
) -> list[dict[str, Any]]:
    """Per (preset, task, variant, config): the variant minus the trivial predictor, seed by seed.

    Each record's ``baseline`` is the trivial predictor's metric on that record's own seed (for
    generated tasks the seed draws the data, so baselines differ between seeds); the difference is
    taken within the record, then averaged over seeds with a t interval -- not against one seed's
    baseline.

    Args:
        records: :class:`Record` s or parsed JSON lines.
        metric: the metric (default: each record's primary metric); records need a baseline for it.
        confidence: level of the t interval.

    Returns:
        One row per group: ``preset``, ``task``, ``variant``, ``metric``, ``higher_is_better``,
        ``favours_variant``, ``n``, ``seeds``, ``mean``, ``std``, ``low``, ``high``,
        ``half_width``, ``t``, ``p`` (paired t test against zero), ``baseline_mean``,
        ``config_hash``.

    Raises:
        ValueError: if a record has no baseline for the metric, or a group repeats a seed.
    """
    confidence = _check_confidence(confidence)
    rows = []
    for (preset, task, variant, config_hash), by_seed in _groups(_records(records)).items():
        seeds = sorted(by_seed)
        first = by_seed[seeds[0]]
        name = metric or first.primary_metric
        lacking = [by_seed[s].key for s in seeds if name not in by_seed[s].baseline]
        if lacking:
            raise ValueError(
                f"metric: no baseline for {name!r} in record {lacking[0]!r} (baselines: {sorted(first.baseline)})"
            )
        baselines = [float(by_seed[s].baseline[name]) for s in seeds]
        test = paired_t_test([by_seed[s].metric(name) - b for s, b in zip(seeds, baselines)], confidence)
        rows.append(
            {
                "preset": preset,
                "task": task,
                "variant": variant,
                "metric": name,
                "higher_is_better": first.higher_is_better,
                "favours_variant": _direction(first.higher_is_better, "baseline"),
                "seeds": seeds,
                **_test_fields(test),
                "baseline_mean": sum(baselines) / len(baselines),
                "config_hash": config_hash,
            }
        )
    return rows
