"""Metrics, bootstrap CIs, tests between models, calibration, thresholds and patient aggregation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score, roc_auc_score
from statsmodels.stats.contingency_tables import mcnemar as statsmodels_mcnemar

from covidscan.data.records import DataError
from covidscan.evaluation import (
    PredictionSet,
    aggregate_by_patient,
    apply_temperature,
    bootstrap_metrics,
    choose_threshold,
    compute_metrics,
    confusion_counts,
    delong_test,
    expected_calibration_error,
    fisher_exact_test,
    fit_temperature,
    mcnemar_test,
    resolve_positive_class,
    significance_stars,
)
from covidscan.evaluation.bootstrap import BatchMetrics, paired_bootstrap_difference
from covidscan.evaluation.stats import EXACT_MCNEMAR_BELOW, compare_predictions


def binary_set(y: list[int], p_positive: list[float], positive: int = 1, **kw) -> PredictionSet:
    p = np.asarray(p_positive, dtype=float)
    proba = np.c_[1 - p, p] if positive == 1 else np.c_[p, 1 - p]
    return PredictionSet(np.asarray(y), proba, ["normal", "COVID"] if positive == 1 else ["COVID", "normal"], **kw)


def random_set(rng: np.random.Generator, n: int, k: int, decimals: int | None = None) -> PredictionSet:
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += 1.0
    if decimals is not None:  # coarse scores -> many ties
        logits = np.round(logits, decimals)
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return PredictionSet(y, proba, [f"class{i}" for i in range(k)])


@pytest.mark.parametrize(
    "names, expected",
    [
        (["COVID", "normal"], 0),
        (["CT_COVID", "CT_NonCOVID"], 0),
        (["non-COVID", "COVID-19"], 1),
        (["CP", "NCP", "Normal"], 1),
        (["Covid", "Normal", "Viral Pneumonia"], 0),
        (["Normal", "covid19"], 1),
    ],
)
def test_positive_class_is_found_by_name(names, expected):
    assert resolve_positive_class(names) == expected


def test_positive_class_explicit_and_unknown():
    assert resolve_positive_class(["a", "b"], "a") == 0
    with pytest.raises(ValueError, match="--positive-class"):
        resolve_positive_class(["a", "b"], "COVID")


def test_binary_metrics_match_hand_computed_values():
    # truth:     P  P  P  P  N  N  N  N  N  N ; predicted positive when p >= 0.5
    y = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    p = [0.9, 0.8, 0.6, 0.3, 0.7, 0.4, 0.2, 0.1, 0.15, 0.05]
    m = compute_metrics(binary_set(y, p), positive=1)
    # TP=3 FN=1 FP=1 TN=5
    assert m["accuracy"].value == pytest.approx(8 / 10)
    assert m["sensitivity"].value == pytest.approx(3 / 4)
    assert m["specificity"].value == pytest.approx(5 / 6)
    assert m["precision"].value == pytest.approx(3 / 4)
    assert m["f1"].value == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    # AUC: of 24 (pos, neg) pairs, the positive 0.3 loses to 0.7 and 0.4; 0.6 loses to 0.7 -> 21/24
    assert m["roc_auc"].value == pytest.approx(21 / 24)
    counts = confusion_counts(binary_set(y, p), positive=1)
    assert counts.tolist() == [[5, 1], [1, 3]]


def test_positive_class_zero_matches_sklearn_pos_label():
    rng = np.random.default_rng(3)
    y, p = rng.integers(0, 2, 60), rng.random(60)
    predictions = binary_set(list(y), list(p), positive=0)  # class 0 is COVID
    m = compute_metrics(predictions, positive=0)
    pred = predictions.proba.argmax(axis=1)
    assert m["sensitivity"].value == pytest.approx(recall_score(y, pred, pos_label=0))
    assert m["precision"].value == pytest.approx(precision_score(y, pred, pos_label=0))
    assert m["roc_auc"].value == pytest.approx(roc_auc_score(y == 0, predictions.proba[:, 0]))


def test_multiclass_metrics_match_sklearn():
    predictions = random_set(np.random.default_rng(0), 300, 3)
    m = compute_metrics(predictions, positive=2)
    y, pred = predictions.y_true, predictions.proba.argmax(axis=1)
    assert m["macro_f1"].value == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["macro_auroc"].value == pytest.approx(roc_auc_score(y, predictions.proba, multi_class="ovr"))
    assert m["sensitivity"].value == pytest.approx(recall_score(y == 2, pred == 2))
    assert m["pr_auc"].value == pytest.approx(average_precision_score(y == 2, predictions.proba[:, 2]))


def test_single_class_present_gives_undefined_cells_not_crashes():
    predictions = binary_set([1, 1, 1], [0.9, 0.4, 0.8])
    m = compute_metrics(predictions, positive=1)
    assert m["roc_auc"].value is None and "only one class" in m["roc_auc"].undefined
    assert m["specificity"].value is None and m["specificity"].undefined
    assert m["sensitivity"].value == pytest.approx(2 / 3)
    intervals = bootstrap_metrics(predictions, 1, n_resamples=50)
    assert intervals["roc_auc"]["ci_low"] is None and intervals["roc_auc"]["n_defined"] == 0


def test_bad_probabilities_and_empty_sets_are_clear_errors():
    with pytest.raises(ValueError, match="NaN"):
        PredictionSet([0, 1], [[0.5, 0.5], [np.nan, 0.5]], ["a", "b"], paths=["x.png", "y.png"])
    with pytest.raises(DataError, match="empty"):
        PredictionSet([], np.zeros((0, 2)), ["a", "b"])


@pytest.mark.parametrize("k, decimals", [(2, None), (2, 1), (3, None), (3, 0)])
def test_batch_metrics_with_unit_weights_equal_point_estimates(k, decimals):
    """The vectorised bootstrap kernel agrees with scikit-learn, ties included."""
    predictions = random_set(np.random.default_rng(k), 400, k, decimals)
    point = compute_metrics(predictions, positive=1)
    batch = BatchMetrics(predictions, positive=1)(np.ones((1, len(predictions)), dtype=np.float32))
    for name, metric in point.items():
        assert batch[name][0] == pytest.approx(metric.value, abs=1e-6), name


def test_batch_metrics_with_count_weights_equal_metrics_of_the_resample():
    rng = np.random.default_rng(5)
    predictions = random_set(rng, 200, 2, decimals=1)
    batch = BatchMetrics(predictions, positive=1)
    draw = rng.integers(0, len(predictions), len(predictions))
    counts = np.bincount(draw, minlength=len(predictions)).astype(np.float32)
    resampled = PredictionSet(predictions.y_true[draw], predictions.proba[draw], predictions.class_names)
    expected = compute_metrics(resampled, positive=1)
    got = batch(counts[batch.order][None, :])
    for name, metric in expected.items():
        assert got[name][0] == pytest.approx(metric.value, abs=1e-6), name


def test_bootstrap_is_seeded_and_independent_of_thread_count(monkeypatch):
    monkeypatch.setattr("covidscan.evaluation.bootstrap._CHUNK_CELLS", 1000)  # several chunks of 10 resamples
    predictions = random_set(np.random.default_rng(1), 100, 2)
    one_thread = bootstrap_metrics(predictions, 1, n_resamples=100, seed=7, workers=1)
    assert bootstrap_metrics(predictions, 1, n_resamples=100, seed=7, workers=3) == one_thread
    assert bootstrap_metrics(predictions, 1, n_resamples=100, seed=8, workers=1) != one_thread


def test_bootstrap_ci_covers_the_true_value_at_about_the_nominal_rate():
    """200 simulated test sets from a binormal model with known accuracy and AUC."""
    rng = np.random.default_rng(2026)
    true_auc = stats.norm.cdf(1.2 / np.sqrt(2))  # positives ~ N(1.2, 1), negatives ~ N(0, 1)
    true_accuracy = 0.5 * stats.norm.cdf(0.6) + 0.5 * stats.norm.cdf(0.6)  # threshold at 0.6 (p = 0.5)
    hits = {"roc_auc": 0, "accuracy": 0}
    trials = 200
    for trial in range(trials):
        y = rng.integers(0, 2, 150)
        score = rng.normal(size=150) + 1.2 * y
        p = 1 / (1 + np.exp(-(score - 0.6) * 3))
        intervals = bootstrap_metrics(binary_set(list(y), list(p)), 1, n_resamples=200, seed=trial)
        hits["roc_auc"] += intervals["roc_auc"]["ci_low"] <= true_auc <= intervals["roc_auc"]["ci_high"]
        hits["accuracy"] += intervals["accuracy"]["ci_low"] <= true_accuracy <= intervals["accuracy"]["ci_high"]
    for name, count in hits.items():
        assert 0.88 <= count / trials <= 0.99, (name, count / trials)


def test_patient_bootstrap_widens_intervals_for_correlated_slices():
    rng = np.random.default_rng(4)
    base = random_set(rng, 60, 2)
    repeat = 6  # six identical slices per patient
    slices = PredictionSet(
        np.repeat(base.y_true, repeat),
        np.repeat(base.proba, repeat, axis=0),
        base.class_names,
        paths=[f"s{i}" for i in range(60 * repeat)],
        patient_ids=[f"p{i // repeat}" for i in range(60 * repeat)],
    )
    by_item = bootstrap_metrics(slices, 1, n_resamples=300, by_patient=False)
    by_patient = bootstrap_metrics(slices, 1, n_resamples=300, by_patient=True)
    patients_only = bootstrap_metrics(base, 1, n_resamples=300)
    for name in ("accuracy", "roc_auc"):
        width = {
            label: r[name]["ci_high"] - r[name]["ci_low"]
            for label, r in (("item", by_item), ("patient", by_patient), ("base", patients_only))
        }
        assert width["patient"] > 1.5 * width["item"], (name, width)
        assert width["patient"] == pytest.approx(width["base"], rel=0.35), (name, width)


def test_paired_difference_of_a_model_with_itself_is_zero_and_a_better_model_wins():
    rng = np.random.default_rng(9)
    y = rng.integers(0, 2, 300)
    good = binary_set(list(y), list(np.clip(0.5 + 0.35 * (2 * y - 1) + rng.normal(0, 0.2, 300), 0, 1)))
    noise = binary_set(list(y), list(rng.random(300)))
    same = paired_bootstrap_difference(good, good, 1, n_resamples=200)
    assert same["roc_auc"]["ci_low"] == same["roc_auc"]["ci_high"] == 0
    better = paired_bootstrap_difference(good, noise, 1, n_resamples=200)
    point = compute_metrics(good, 1)["roc_auc"].value - compute_metrics(noise, 1)["roc_auc"].value
    assert 0 < better["roc_auc"]["ci_low"] <= point <= better["roc_auc"]["ci_high"]
    with pytest.raises(ValueError, match="same items"):
        paired_bootstrap_difference(good, binary_set([0, 1], [0.2, 0.8]), 1)


def _slow_delong(is_pos: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """DeLong et al. (1988) from the definitions: O(N^2) pairwise kernel and placement values."""

    def components(score: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        x, y = score[is_pos], score[~is_pos]
        psi = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])
        return psi.mean(), psi.mean(axis=1), psi.mean(axis=0)

    auc_a, v10_a, v01_a = components(a)
    auc_b, v10_b, v01_b = components(b)
    m, n = is_pos.sum(), (~is_pos).sum()
    s10 = np.cov(np.vstack([v10_a, v10_b]))
    s01 = np.cov(np.vstack([v01_a, v01_b]))
    cov = s10 / m + s01 / n
    z = (auc_a - auc_b) / np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    return float(z), float(2 * stats.norm.sf(abs(z)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_delong_matches_the_slow_definition(seed):
    rng = np.random.default_rng(seed)
    is_pos = rng.random(120) < 0.4
    a = np.round(rng.normal(size=120) + 1.0 * is_pos, 1)  # rounding creates ties
    b = np.round(0.6 * a + rng.normal(size=120) + 0.3 * is_pos, 1)
    result = delong_test(is_pos, a, b)
    z, p = _slow_delong(is_pos, a, b)
    assert result.statistic == pytest.approx(z, rel=1e-9)
    assert result.p_value == pytest.approx(p, rel=1e-9)
    assert result.auc_a == pytest.approx(roc_auc_score(is_pos, a))


def test_delong_hand_computed_example():
    """3 positives, 3 negatives. Model A ranks perfectly (AUC 1); model B has AUC 5/9.

    Placement values of B: positives [1, 2/3, 0] (sample variance 7/27), negatives [1/3, 2/3, 2/3]
    (1/27); A's are constant, so var(A) = cov(A, B) = 0 and var(A - B) = (7/27 + 1/27) / 3 = 8/81.
    z = (1 - 5/9) / sqrt(8/81) = sqrt(2).
    """
    is_pos = np.array([True, True, True, False, False, False])
    a = np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1])
    b = np.array([0.9, 0.5, 0.1, 0.6, 0.4, 0.3])
    result = delong_test(is_pos, a, b)
    assert (result.auc_a, result.auc_b) == pytest.approx((1.0, 5 / 9))
    assert result.statistic == pytest.approx(np.sqrt(2))
    assert result.p_value == pytest.approx(2 * stats.norm.sf(np.sqrt(2)))


def test_delong_identical_models_and_one_class():
    is_pos = np.array([True, False, True, False])
    scores = np.array([0.8, 0.3, 0.6, 0.4])
    assert delong_test(is_pos, scores, scores).p_value == 1.0
    with pytest.raises(ValueError, match="two positive and two negative"):
        delong_test(np.ones(4, bool), scores, scores)


def test_delong_is_undefined_not_nan_with_a_single_positive():
    """One positive item leaves the AUC variance undefined: the comparison says so instead of p = nan."""
    y_true = np.array([1, 0, 0, 0])
    pred = np.array([1, 0, 0, 1])
    scores_a, scores_b = np.array([0.9, 0.2, 0.3, 0.6]), np.array([0.7, 0.4, 0.1, 0.8])
    with pytest.raises(ValueError, match="two positive and two negative"):
        delong_test(y_true == 1, scores_a, scores_b)
    delong = compare_predictions(y_true, pred, pred, 1, scores_a, scores_b)[-1]
    assert delong.test == "DeLong" and delong.p_value is None and "undefined" in delong.detail
    assert delong.stars == ""


@pytest.mark.parametrize("n, flip", [(40, 0.2), (400, 0.3)])
def test_mcnemar_matches_statsmodels(n, flip):
    rng = np.random.default_rng(n)
    a = rng.random(n) < 0.8
    b = np.where(rng.random(n) < flip, ~a, a)
    ours = mcnemar_test(a, b)
    table = [[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]]
    exact = (table[0][1] + table[1][0]) < EXACT_MCNEMAR_BELOW
    reference = statsmodels_mcnemar(table, exact=exact, correction=True)
    assert ("exact" in ours.test) == exact
    assert ours.p_value == pytest.approx(reference.pvalue)


def test_fisher_matches_scipy_on_the_documented_table():
    a = np.array([True] * 45 + [False] * 5)
    b = np.array([True] * 35 + [False] * 15)
    result = fisher_exact_test(a, b)
    odds, p = stats.fisher_exact([[45, 5], [35, 15]])
    assert result.p_value == pytest.approx(p) and result.statistic == pytest.approx(odds)
    assert "[[45, 5], [35, 15]]" in result.detail


@pytest.mark.parametrize("p, stars", [(0.2, ""), (0.04, "*"), (0.009, "**"), (0.0004, "***"), (None, "")])
def test_significance_stars(p, stars):
    assert significance_stars(p) == stars


def test_ece_hand_computed_and_perfect_calibration():
    # Two bins used: confidence 0.9 (4 items, 3 right) and 0.6 (2 items, 1 right).
    proba = np.array([[0.9, 0.1]] * 4 + [[0.4, 0.6]] * 2)
    y = np.array([0, 0, 0, 1, 1, 0])
    expected = (4 * abs(0.75 - 0.9) + 2 * abs(0.5 - 0.6)) / 6
    assert expected_calibration_error(proba, y, n_bins=10) == pytest.approx(expected)
    rng = np.random.default_rng(0)
    p = rng.uniform(0.5, 1, 20000)
    y = (rng.random(20000) >= p).astype(int)  # class 0 is right with probability p exactly
    assert expected_calibration_error(np.c_[p, 1 - p], y) < 0.02


def test_temperature_scaling_recovers_overconfidence():
    rng = np.random.default_rng(1)
    n = 3000
    y = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), y] += 1.5
    calibrated = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    draws = np.array([rng.choice(3, p=row) for row in calibrated])  # labels drawn from calibrated probs
    overconfident = apply_temperature(calibrated, 1 / 2.5)  # logits x 2.5
    temperature = fit_temperature(overconfident, draws)
    assert temperature == pytest.approx(2.5, rel=0.15)
    assert expected_calibration_error(
        apply_temperature(overconfident, temperature), draws
    ) < expected_calibration_error(overconfident, draws)


def test_thresholds_youden_and_target_sensitivity():
    is_pos = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
    scores = np.array([0.9, 0.8, 0.55, 0.3, 0.6, 0.35, 0.2, 0.1])
    youden = choose_threshold(is_pos, scores)
    assert youden.threshold == pytest.approx(0.8)  # sens 0.5 spec 1.0 ties with 0.55 (0.75, 0.75); first max
    target = choose_threshold(is_pos, scores, method="sensitivity", target_sensitivity=0.95)
    assert target.threshold == pytest.approx(0.3) and target.sensitivity_at_choice == 1.0
    assert target.specificity_at_choice == pytest.approx(0.5)
    with pytest.raises(ValueError, match="one class"):
        choose_threshold(np.ones(3, bool), np.array([0.1, 0.2, 0.3]))


def test_patient_aggregation_mean_and_max():
    predictions = PredictionSet(
        [1, 1, 0, 0],
        [[0.2, 0.8], [0.6, 0.4], [0.9, 0.1], [0.7, 0.3]],
        ["normal", "COVID"],
        paths=["a1", "a2", "b1", "c1"],
        patient_ids=["A", "A", "B", None],
    )
    mean = aggregate_by_patient(predictions, "mean")
    assert mean.patient_ids == ["A", "B", "c1"]
    assert mean.proba[0].tolist() == pytest.approx([0.4, 0.6])
    assert mean.y_true.tolist() == [1, 0, 0]
    maximum = aggregate_by_patient(predictions, "max")
    assert maximum.proba[0].tolist() == pytest.approx([0.6 / 1.4, 0.8 / 1.4])


def test_per_source_metrics_are_each_sources_own_with_intervals():
    """A model that ranks one source perfectly and the other backwards: pooled AUC hides it, per source shows it."""
    from covidscan.evaluation.evaluate import per_source_metrics

    y = [1, 1, 0, 0] * 5 + [1, 1, 0, 0] * 5
    p = [0.9, 0.8, 0.2, 0.1] * 5 + [0.3, 0.35, 0.6, 0.7] * 5
    predictions = binary_set(y, p)
    sources = ["home"] * 20 + ["away"] * 20
    parts = per_source_metrics(predictions, sources, 1, n_bootstrap=50, seed=0, threshold=0.5)
    assert list(parts) == ["home", "away"]
    assert parts["home"].metrics["roc_auc"].value == 1.0 and parts["away"].metrics["roc_auc"].value == 0.0
    for name, part in parts.items():
        rows = [i for i, s in enumerate(sources) if s == name]
        expected = compute_metrics(binary_set([y[i] for i in rows], [p[i] for i in rows]), 1)
        assert {k: v.value for k, v in part.metrics.items()} == {k: v.value for k, v in expected.items()}
        assert part.n_items == 20 and part.class_counts == {"COVID": 10, "normal": 10}
        assert part.metrics["accuracy"].ci_low is not None and part.bootstrap.n_resamples == 50
    assert parts["home"].at_threshold["sensitivity"].value == 1.0
    assert parts["away"].at_threshold["sensitivity"].value == 0.0
    assert per_source_metrics(predictions, ["home"] * 40, 1, n_bootstrap=0, seed=0) == {}
    assert per_source_metrics(predictions, [None] * 40, 1, n_bootstrap=0, seed=0) == {}
    unlabelled = per_source_metrics(predictions, ["home"] * 20 + [None] * 20, 1, n_bootstrap=0, seed=0)
    assert list(unlabelled) == ["home", "(no source)"]
