"""Tests of deform_attn.experiments.stats: t distribution, paired tests, Holm, hierarchical bootstrap."""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import pytest

from deform_attn.experiments import results, schema, stats

# ---------------------------------------------------------------------------- t distribution

# published two-sided table values (t_{p, df}); quoted to 6 decimals
TABLE = [
    (0.975, 1, 12.706205),
    (0.975, 2, 4.302653),
    (0.975, 5, 2.570582),
    (0.975, 30, 2.042272),
    (0.975, 120, 1.979930),
    (0.995, 10, 3.169273),
    (0.95, 3, 2.353363),
    (0.90, 20, 1.325341),
    (0.9995, 5, 6.868827),
]


@pytest.mark.parametrize("p, df, expected", TABLE)
def test_t_quantile_matches_published_tables(p, df, expected):
    assert stats.t_quantile(p, df) == pytest.approx(expected, abs=1e-6)
    assert stats.t_quantile(1 - p, df) == pytest.approx(-expected, abs=1e-6)


@pytest.mark.parametrize("p, df, expected", TABLE)
def test_t_cdf_inverts_the_table(p, df, expected):
    # the table's 6 decimals move the cdf by at most density * 5e-7
    assert stats.t_cdf(expected, df) == pytest.approx(p, abs=5e-7)


@pytest.mark.parametrize(
    "x, df, expected",
    [
        (2.0, 5, 0.9490302605850708),
        (-3.0, 10, 0.006671827511284785),
        (0.5, 2.5, 0.6711510400651426),
        (-10.0, 3, 0.0010641995292070751),
    ],
)
def test_t_cdf_known_values(x, df, expected):
    assert stats.t_cdf(x, df) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("p", [1e-12, 1e-6, 0.001, 0.025, 0.2, 0.5, 0.8, 0.975, 0.999])
def test_t_closed_forms_for_one_and_two_degrees_of_freedom(p):
    # df = 1 is the Cauchy distribution, quantile tan(pi (p - 1/2)) = -cot(pi p) (precise for tiny p);
    # df = 2 has F(x) = 1/2 + x / (2 sqrt(2 + x^2))
    assert stats.t_quantile(p, 1) == pytest.approx(-1 / math.tan(math.pi * p), rel=1e-12, abs=1e-15)
    x = stats.t_quantile(p, 1)
    cauchy_cdf = math.atan(-1 / x) / math.pi if x < 0 else 0.5 + math.atan(x) / math.pi
    assert stats.t_cdf(x, 1) == pytest.approx(cauchy_cdf, rel=1e-12, abs=0)
    expected_two = (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    assert stats.t_quantile(p, 2) == pytest.approx(expected_two, rel=1e-12, abs=1e-12)
    x = stats.t_quantile(p, 2)
    root = math.sqrt(2 + x * x)  # F(-|x|) = 1 / (root (root + |x|)), the same without cancellation
    lower_tail = 1 / (root * (root + abs(x)))
    assert stats.t_cdf(-abs(x), 2) == pytest.approx(lower_tail, rel=1e-12, abs=0)
    assert stats.t_cdf(x, 2) == pytest.approx(lower_tail if x < 0 else 1 - lower_tail, rel=1e-12, abs=0)


@pytest.mark.parametrize("df", [0.5, 1, 3, 7.5, 29, 1000, 1e6])
@pytest.mark.parametrize("p", [1e-9, 0.01, 0.3, 0.7, 0.99])
def test_t_quantile_and_cdf_round_trip(df, p):
    x = stats.t_quantile(p, df)
    assert stats.t_cdf(x, df) == pytest.approx(p, rel=1e-10)
    assert stats.t_cdf(-x, df) == pytest.approx(1 - p, rel=1e-10)


def test_t_approaches_the_normal_for_many_degrees_of_freedom():
    z = 1.959963984540054
    assert stats.t_quantile(0.975, math.inf) == pytest.approx(z, rel=1e-14)
    assert stats.t_quantile(0.975, 1e12) == pytest.approx(z, rel=1e-10)
    # first-order expansion t = z + (z^3 + z) / (4 df) + O(df^-2)
    assert stats.t_quantile(0.975, 1e5) == pytest.approx(z + (z**3 + z) / 4e5, abs=1e-9)
    quantiles = [stats.t_quantile(0.975, df) for df in (1, 2, 5, 30, 1000, 1e9)]
    assert quantiles == sorted(quantiles, reverse=True)


def test_results_t_quantile_uses_the_exact_quantile_beyond_the_table():
    assert results.t_quantile_975(31) == pytest.approx(stats.t_quantile(0.975, 31), rel=1e-14)
    assert results.t_quantile_975(40) == pytest.approx(2.021075, abs=1e-6)
    assert results.t_quantile_975(30) == pytest.approx(stats.t_quantile(0.975, 30), abs=5e-7)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: stats.t_quantile(0.0, 3), "p: expected a probability"),
        (lambda: stats.t_quantile(1.0, 3), "p: expected a probability"),
        (lambda: stats.t_quantile(0.5, 0), "df: expected degrees of freedom > 0"),
        (lambda: stats.t_quantile(0.5, math.nan), "df: expected degrees of freedom > 0"),
        (lambda: stats.t_cdf(math.nan, 3), "x: expected a number"),
        (lambda: stats.t_cdf(1.0, -2), "df: expected degrees of freedom > 0"),
    ],
)
def test_t_argument_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_t_df_must_be_a_number():
    with pytest.raises(TypeError, match="df: expected a real number"):
        stats.t_quantile(0.5, "3")


# ---------------------------------------------------------------------------- intervals, tests, Holm


def test_mean_t_interval_by_hand():
    interval = stats.mean_t_interval([0.5, 0.6, 0.7])
    half_width = 4.302652729749461 * 0.1 / math.sqrt(3)
    assert interval["n"] == 3 and interval["mean"] == pytest.approx(0.6)
    assert interval["std"] == pytest.approx(0.1)
    assert interval["half_width"] == pytest.approx(half_width, rel=1e-12)
    assert (interval["low"], interval["high"]) == pytest.approx((0.6 - half_width, 0.6 + half_width))
    wider = stats.mean_t_interval([0.5, 0.6, 0.7], confidence=0.99)
    assert wider["half_width"] == pytest.approx(9.924843200918 * 0.1 / math.sqrt(3), rel=1e-10)


def test_mean_t_interval_degenerate_sizes():
    single = stats.mean_t_interval([0.3])
    assert single["n"] == 1 and single["mean"] == 0.3 and math.isnan(single["half_width"])
    assert math.isnan(single["low"]) and math.isnan(single["high"])
    empty = stats.mean_t_interval([])
    assert empty["n"] == 0 and math.isnan(empty["mean"])
    constant = stats.mean_t_interval([0.2, 0.2, 0.2])
    assert constant["half_width"] == 0.0 and constant["low"] == constant["high"] == pytest.approx(0.2)


def test_paired_t_test_by_hand():
    # differences 0.1, 0.2, 0.1: mean 2/15, std sqrt(1/300), t = mean / (std / sqrt 3) = 4 on 2 df;
    # with 2 df, P(|T| > t) = 1 - t / sqrt(2 + t^2)
    test = stats.paired_t_test([0.1, 0.2, 0.1])
    assert test["n"] == 3 and test["mean"] == pytest.approx(0.4 / 3)
    assert test["t"] == pytest.approx(4.0, rel=1e-12)
    assert test["p"] == pytest.approx(1 - 4 / math.sqrt(18), rel=1e-12)
    half_width = 4.302652729749461 * math.sqrt(1 / 300) / math.sqrt(3)
    assert (test["low"], test["high"]) == pytest.approx((0.4 / 3 - half_width, 0.4 / 3 + half_width))
    assert stats.paired_t_test([-0.1, -0.2, -0.1])["t"] == pytest.approx(-4.0)
    assert stats.paired_t_test([-0.1, -0.2, -0.1])["p"] == pytest.approx(test["p"])


def test_paired_t_test_p_agrees_with_its_interval():
    # the 95% interval excludes zero exactly when p < 0.05
    for differences in ([0.1, 0.3, -0.05, 0.2], [0.02, -0.01, 0.03], [1.0, 1.1, 0.9, 1.05, 0.95]):
        test = stats.paired_t_test(differences)
        assert (test["p"] < 0.05) == (test["low"] > 0 or test["high"] < 0)


def test_paired_t_test_degenerate_cases():
    one = stats.paired_t_test([0.1])
    assert math.isnan(one["t"]) and math.isnan(one["p"])
    equal = stats.paired_t_test([0.1, 0.1, 0.1])
    assert equal["t"] == math.inf and equal["p"] == 0.0
    zero = stats.paired_t_test([0.0, 0.0])
    assert zero["t"] == 0.0 and zero["p"] == 1.0


def test_holm_worked_example():
    rows = stats.holm([0.01, 0.04, 0.03, 0.005], alpha=0.05)
    assert [r["adjusted_p"] for r in rows] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert [r["reject"] for r in rows] == [True, False, False, True]
    assert [r["p"] for r in rows] == [0.01, 0.04, 0.03, 0.005]


def test_holm_is_monotone_capped_and_skips_missing_tests():
    rows = stats.holm([0.5, 0.6, math.nan])
    assert [r["adjusted_p"] for r in rows[:2]] == [1.0, 1.0]  # 2 * 0.5 = 1, then max(1, 0.6)
    assert math.isnan(rows[2]["adjusted_p"]) and rows[2]["reject"] is False
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 0.1, size=12).tolist()
    adjusted = [r["adjusted_p"] for r in stats.holm(p)]
    order = np.argsort(p)
    assert np.all(np.diff(np.asarray(adjusted)[order]) >= 0)
    assert all(q >= raw for q, raw in zip(adjusted, p)) and max(adjusted) <= 1.0
    assert stats.holm([]) == []
    # one test: no correction
    assert stats.holm([0.03])[0]["adjusted_p"] == 0.03


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: stats.holm([0.1, 1.2]), "p_values: expected probabilities"),
        (lambda: stats.holm([0.1], alpha=0.0), "alpha: expected"),
        (lambda: stats.mean_t_interval([1.0, math.inf]), "values: expected finite"),
        (lambda: stats.mean_t_interval([1.0, 2.0], confidence=1.0), "confidence: expected"),
        (lambda: stats.paired_t_test([[1.0, 2.0]]), "differences: expected a 1-D"),
        (lambda: stats.paired_t_test([0.1, math.nan]), "differences: expected finite"),
    ],
)
def test_interval_and_holm_argument_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------- hierarchical bootstrap


def _classification_outcomes(rng, seeds, examples, effect, seed_spread):
    """0/1 correctness; per-example difficulty shared by both variants, a per-seed shift on the variant."""
    difficulty = rng.uniform(0.2, 0.75, size=(seeds, examples))
    shift = rng.normal(0.0, seed_spread, size=(seeds, 1))
    reference = (rng.random((seeds, examples)) < difficulty).astype(float)
    variant = (rng.random((seeds, examples)) < np.clip(difficulty + effect + shift, 0, 1)).astype(float)
    return variant, reference


def test_bootstrap_covers_the_true_difference_in_simulation():
    rng = np.random.default_rng(1)
    effect, covered, covered_wrong = 0.05, 0, 0
    for replicate in range(40):
        variant, reference = _classification_outcomes(rng, 6, 200, effect, 0.03)
        interval = stats.hierarchical_bootstrap_difference(variant, reference, resamples=2000, seed=replicate)
        covered += interval["low"] <= effect <= interval["high"]
        covered_wrong += interval["low"] <= effect + 0.15 <= interval["high"]
        assert interval["low"] <= interval["mean"] <= interval["high"]
    assert covered >= 36  # nominal 95%: at least 90% of 40
    assert covered_wrong <= 4  # and it is not trivially wide


def test_bootstrap_is_paired():
    rng = np.random.default_rng(2)
    outcomes = rng.normal(size=(5, 300)) ** 2
    same = stats.hierarchical_bootstrap_difference(outcomes, outcomes.copy(), resamples=500)
    assert (same["mean"], same["low"], same["high"]) == (0.0, 0.0, 0.0)
    shifted = stats.hierarchical_bootstrap_difference(outcomes + 0.25, outcomes, resamples=500)
    assert shifted["low"] == pytest.approx(0.25, abs=1e-12) and shifted["high"] == pytest.approx(0.25, abs=1e-12)
    # unpaired resampling would see the large example-to-example spread; paired sees none
    assert shifted["high"] - shifted["low"] < 1e-9 < float(outcomes.std())


def test_bootstrap_widens_when_seeds_disagree():
    rng = np.random.default_rng(3)
    reference = rng.normal(size=(6, 400)) ** 2
    noise = rng.normal(0.0, 0.5, size=(6, 400))
    agree = stats.hierarchical_bootstrap_difference(reference + 0.1 + noise, reference, resamples=4000)
    seed_offsets = np.array([[0.3], [-0.3], [0.2], [-0.2], [0.25], [-0.25]])
    disagreeing = reference + 0.1 + noise + seed_offsets
    disagree = stats.hierarchical_bootstrap_difference(disagreeing, reference, resamples=4000)
    assert agree["mean"] == pytest.approx(disagree["mean"])  # offsets average to zero
    assert disagree["high"] - disagree["low"] > 3 * (agree["high"] - agree["low"])


def test_bootstrap_methods_agree_on_discrete_outcomes():
    rng = np.random.default_rng(4)
    variant, reference = _classification_outcomes(rng, 6, 500, 0.04, 0.02)
    by_counts = stats.hierarchical_bootstrap_difference(variant, reference, method="counts", seed=1)
    by_indices = stats.hierarchical_bootstrap_difference(variant, reference, method="indices", seed=2)
    assert by_counts["mean"] == by_indices["mean"] == pytest.approx(float((variant - reference).mean()))
    width = by_indices["high"] - by_indices["low"]
    assert by_counts["low"] == pytest.approx(by_indices["low"], abs=0.05 * width)
    assert by_counts["high"] == pytest.approx(by_indices["high"], abs=0.05 * width)
    auto = stats.hierarchical_bootstrap_difference(variant, reference, seed=1)
    assert auto == by_counts  # 0/1 outcomes take the counts path, deterministically per seed


def test_bootstrap_is_reproducible_and_confidence_orders_intervals():
    rng = np.random.default_rng(5)
    variant, reference = rng.normal(size=(4, 100)), rng.normal(size=(4, 100))
    first = stats.hierarchical_bootstrap_difference(variant, reference, resamples=1000, seed=7)
    assert first == stats.hierarchical_bootstrap_difference(variant, reference, resamples=1000, seed=7)
    assert first != stats.hierarchical_bootstrap_difference(variant, reference, resamples=1000, seed=8)
    narrow = stats.hierarchical_bootstrap_difference(variant, reference, resamples=1000, seed=7, confidence=0.5)
    assert first["low"] < narrow["low"] < narrow["high"] < first["high"]
    assert (first["seeds"], first["examples"], first["resamples"]) == (4, 100, 1000)


def test_bootstrap_of_ten_thousand_resamples_is_fast():
    rng = np.random.default_rng(6)
    reference = rng.normal(size=(6, 1000)) ** 2  # continuous: the general (index) path
    variant = reference + rng.normal(0.0, 0.1, size=(6, 1000))
    stats.hierarchical_bootstrap_difference(variant, reference, resamples=100)  # warm up
    start = time.perf_counter()
    stats.hierarchical_bootstrap_difference(variant, reference, resamples=10_000)
    assert time.perf_counter() - start < 2.0  # typically 0.2 s on a shared 2-core CPU


_ZEROS = np.zeros((2, 2))


@pytest.mark.parametrize(
    "variant, reference, kwargs, match",
    [
        (np.zeros(5), np.zeros(5), {}, "outcomes_variant: expected a \\(seeds, examples\\)"),
        (np.zeros((2, 5)), np.zeros((2, 4)), {}, "outcomes_reference: expected the shape"),
        (np.zeros((0, 5)), np.zeros((0, 5)), {}, "outcomes_variant: expected"),
        (np.full((2, 2), np.nan), _ZEROS, {}, "outcomes_variant: expected finite"),
        (_ZEROS, _ZEROS, {"resamples": 0}, "resamples: expected"),
        (_ZEROS, _ZEROS, {"resamples": 2.5}, "resamples: expected"),
        (_ZEROS, _ZEROS, {"confidence": 95}, "confidence: expected"),
        (_ZEROS, _ZEROS, {"method": "fast"}, "method: expected"),
    ],
)
def test_bootstrap_argument_errors(variant, reference, kwargs, match):
    with pytest.raises(ValueError, match=match):
        stats.hierarchical_bootstrap_difference(variant, reference, **kwargs)


# ---------------------------------------------------------------------------- from records

_HAS_OUTCOMES_FIELD = "test_outcomes" in {f.name for f in dataclasses.fields(schema.Record)}


def _record(task, variant, seed, value, kind="test_accuracy", baseline=0.1, outcomes=None, **changes):
    """A complete Record with ``value`` as its primary metric (and ``outcomes`` as test_outcomes)."""
    record = schema.Record(
        schema=schema.SCHEMA_VERSION, key=f"{task}/{variant}/{variant}/{seed}", preset="p", task=task,
        task_kind="regression" if kind == "test_mse" else "classification", variant=variant, attention=variant,
        axis=None, overrides={}, config_hash=variant, config={}, seed=seed, shard=None, primary_metric=kind,
        higher_is_better=kind != "test_mse", metrics={kind: value, "final_train_loss": 0.5}, finite=True,
        baseline={kind: baseline}, reference={}, sequence_length=8, num_train=4, num_test=4, params=1,
        train_time_s=1.0, eval_time_s=0.1, run_wall_s=1.2, run_cpu_s=1.1, amp="none", device="cpu",
        device_name="x", threads=1, torch="x", python="3.11", git_commit="0" * 40,
        finished_at="2026-01-01T00:00:00+0000",
    )
    record = dataclasses.replace(record, **changes)
    if outcomes is not None:
        if _HAS_OUTCOMES_FIELD:
            record = dataclasses.replace(record, test_outcomes=list(outcomes))
        else:  # before schema.Record has the field: stats reads it with getattr
            object.__setattr__(record, "test_outcomes", list(outcomes))
    return record


def test_paired_comparisons_by_hand():
    data = [_record("t", "full", s, v) for s, v in enumerate([0.5, 0.6, 0.7, 0.9])]
    data += [_record("t", "deformable", s, v) for s, v in enumerate([0.6, 0.8, 0.8])]  # seed 3 missing
    (row,) = stats.paired_comparisons(data, reference="full")
    assert row["seeds"] == [0, 1, 2] and row["n"] == 3 and row["variant"] == "deformable"
    assert row["mean"] == pytest.approx(0.4 / 3)
    assert row["t"] == pytest.approx(4.0) and row["p"] == pytest.approx(1 - 4 / math.sqrt(18))
    assert row["p_holm"] == row["p"] and row["family_size"] == 1  # a family of one
    assert row["half_width"] == pytest.approx(4.302652729749461 * math.sqrt(1 / 300) / math.sqrt(3))
    assert row["higher_is_better"] and "> 0" in row["favours_variant"]
    assert math.isnan(row["bootstrap_low"]) and "lack test_outcomes" in row["note"]
    # the old helper agrees on the t interval
    (old,) = results.paired_differences([r.to_dict() for r in data], reference="full")
    assert old["ci95"] == pytest.approx(row["half_width"], rel=1e-6)


def test_paired_comparisons_holm_family_spans_tasks_and_variants():
    rng = np.random.default_rng(8)
    data = []
    for task in ("a", "b"):
        for seed in range(5):
            base = 0.6 + 0.05 * rng.normal()
            data.append(_record(task, "full", seed, base))
            data.append(_record(task, "deformable", seed, base + 0.03 + 0.01 * rng.normal()))
            data.append(_record(task, "no_offsets", seed, base + 0.01 * rng.normal()))
    rows = stats.paired_comparisons(data, reference="full")
    assert [(r["task"], r["variant"]) for r in rows] == [
        ("a", "deformable"), ("a", "no_offsets"), ("b", "deformable"), ("b", "no_offsets"),
    ]
    expected = stats.holm([r["p"] for r in rows])
    assert [r["p_holm"] for r in rows] == [e["adjusted_p"] for e in expected]
    assert [r["reject"] for r in rows] == [e["reject"] for e in expected]
    assert all(r["family_size"] == 4 and r["p_holm"] >= r["p"] for r in rows)
    assert any(r["p_holm"] > r["p"] for r in rows)
    # a per-task family: pass only that task's records
    (a_deformable, _) = stats.paired_comparisons([r for r in data if r.task == "a"], reference="full")
    assert a_deformable["family_size"] == 2 and a_deformable["p_holm"] <= rows[0]["p_holm"]


def test_paired_comparisons_bootstrap_from_test_outcomes():
    rng = np.random.default_rng(9)
    variant_outcomes, reference_outcomes = _classification_outcomes(rng, 4, 300, 0.05, 0.02)
    data = []
    for seed in range(4):
        for variant, outcomes in (("full", reference_outcomes[seed]), ("deformable", variant_outcomes[seed])):
            data.append(_record("t", variant, seed, float(outcomes.mean()), outcomes=outcomes))
    (row,) = stats.paired_comparisons(data, reference="full", resamples=2000, seed=3)
    direct = stats.hierarchical_bootstrap_difference(variant_outcomes, reference_outcomes, resamples=2000, seed=3)
    assert (row["bootstrap_mean"], row["bootstrap_low"], row["bootstrap_high"]) == (
        direct["mean"], direct["low"], direct["high"],
    )
    assert row["bootstrap_mean"] == pytest.approx(row["mean"]) and row["note"] == ""
    # one record without outcomes: no bootstrap, and the row says why
    data[-1] = _record("t", "deformable", 3, data[-1].metric())
    (row,) = stats.paired_comparisons(data, reference="full", resamples=200)
    assert math.isnan(row["bootstrap_low"]) and "lack test_outcomes" in row["note"] and not math.isnan(row["p"])
    # outcomes describe the primary metric only
    (other,) = stats.paired_comparisons(data[:-1], reference="full", metric="final_train_loss", resamples=200)
    assert math.isnan(other["bootstrap_low"]) and "describe test_accuracy" in other["note"]


def test_paired_comparisons_mse_direction_and_single_seed():
    data = [_record("r", "full", s, v, kind="test_mse") for s, v in enumerate([0.20, 0.30])]
    data += [_record("r", "deformable", s, v, kind="test_mse") for s, v in enumerate([0.10, 0.25])]
    data += [_record("r", "tiny", 0, 0.5, kind="test_mse")]
    rows = {r["variant"]: r for r in stats.paired_comparisons(data, reference="full")}
    assert rows["deformable"]["mean"] == pytest.approx(-0.075)  # variant - reference, negative = better
    assert not rows["deformable"]["higher_is_better"] and "< 0" in rows["deformable"]["favours_variant"]
    single = rows["tiny"]
    assert single["n"] == 1 and math.isnan(single["p"]) and math.isnan(single["p_holm"]) and not single["reject"]
    assert "fewer than 2 paired seeds" in single["note"]
    assert rows["deformable"]["family_size"] == 1  # the single-seed contrast has no p, so no place in the family


def test_paired_comparisons_errors():
    data = [_record("t", "full", s, 0.5) for s in range(3)] + [_record("t", "deformable", s, 0.6) for s in range(3)]
    with pytest.raises(ValueError, match="reference: no records of variant 'dense'"):
        stats.paired_comparisons(data, reference="dense")
    duplicate = data + [_record("t", "full", 1, 0.55)]
    with pytest.raises(ValueError, match="reference 'full'.*two records for seed 1"):
        stats.paired_comparisons(duplicate, reference="full")
    ragged = [_record("t", "full", s, 0.5, outcomes=[1.0, 0.0, 1.0]) for s in range(2)]
    ragged.append(_record("t", "deformable", 0, 0.5, outcomes=[1.0, 0.0, 1.0]))
    ragged.append(_record("t", "deformable", 1, 0.5, outcomes=[1.0]))  # seed 1: 1 example, reference 3
    with pytest.raises(ValueError, match="test_outcomes .* differ in length"):
        stats.paired_comparisons(ragged, reference="full")


def test_paired_comparisons_read_json_dicts():
    data = [
        _record("t", v, s, 0.5 + 0.1 * s + 0.05 * (v == "deformable")).to_dict()
        for v in ("full", "deformable")
        for s in range(3)
    ]
    (row,) = stats.paired_comparisons(data, reference="full")
    assert row["mean"] == pytest.approx(0.05) and row["half_width"] == pytest.approx(0.0, abs=1e-12)


def test_baseline_differences_pair_each_seed_with_its_own_baseline():
    # baselines differ by seed (the seed draws the data); the variant beats each by exactly 0.1
    baselines = [0.5, 0.6, 0.7]
    data = [_record("t", "deformable", s, b + 0.1, baseline=b) for s, b in enumerate(baselines)]
    (row,) = stats.baseline_differences(data)
    assert row["mean"] == pytest.approx(0.1) and row["half_width"] == pytest.approx(0.0, abs=1e-12)
    assert row["n"] == 3 and row["seeds"] == [0, 1, 2] and row["baseline_mean"] == pytest.approx(0.6)
    assert row["p"] == 0.0 and "> 0" in row["favours_variant"]
    # against seed 0's baseline the difference would be 0.1, 0.2, 0.3: a different, wrong answer
    seed0 = stats.mean_t_interval([r.metric() - baselines[0] for r in data])
    assert seed0["mean"] == pytest.approx(0.2) and seed0["half_width"] > 0.2
    assert abs(row["mean"] - seed0["mean"]) > 0.09


def test_baseline_differences_errors_and_regression_direction():
    data = [_record("r", "full", s, 0.1, kind="test_mse", baseline=0.2) for s in range(2)]
    (row,) = stats.baseline_differences(data)
    assert row["mean"] == pytest.approx(-0.1) and "< 0" in row["favours_variant"]
    with pytest.raises(ValueError, match="metric: no baseline for 'final_train_loss'"):
        stats.baseline_differences(data, metric="final_train_loss")
    with pytest.raises(ValueError, match="two records for seed 0"):
        stats.baseline_differences(data + [_record("r", "full", 0, 0.1, kind="test_mse")])
