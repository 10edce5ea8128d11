"""Splits: ratios, stratification, patient grouping, k-fold, determinism, save/load."""

from __future__ import annotations

from collections import Counter

import pytest

from covidscan.config import SplitConfig
from covidscan.data.records import DataError, Sample, SampleSet
from covidscan.data.splits import LeakageWarning, assign_splits, load_splits, save_splits, split_counts

pytestmark = pytest.mark.filterwarnings("ignore::covidscan.data.splits.LeakageWarning")


def make_set(n_per_class: int = 50, slices_per_patient: int | None = None, classes=("COVID", "normal")) -> SampleSet:
    samples = []
    for label in classes:
        for i in range(n_per_class):
            patient = f"{label}-p{i // slices_per_patient}" if slices_per_patient else None
            samples.append(Sample(f"/data/{label}/{label} ({i}).png", label, patient))
    return SampleSet(samples, list(classes))


@pytest.mark.parametrize("ratios", [[0.75, 0.25, 0.0], [0.8, 0.1, 0.1], [0.7, 0.0, 0.3]])
def test_stratified_ratios_and_empty_zero_splits(ratios):
    result = assign_splits(make_set(100), SplitConfig(method="stratified", ratios=ratios), seed=0)
    counts = split_counts(result)
    for name, ratio in zip(("train", "val", "test"), ratios):
        assert abs(counts[name] - ratio * 200) <= 2, counts
        if ratio == 0:
            assert counts[name] == 0
    for name in ("train", "test"):  # class balance is kept inside each split
        per_class = Counter(s.label for s in result.subset(name).samples)
        if per_class:
            assert abs(per_class["COVID"] - per_class["normal"]) <= 1


def test_stratified_keeps_imbalanced_class_proportions():
    samples = make_set(90, classes=("a",)).samples + make_set(10, classes=("b",)).samples
    result = assign_splits(SampleSet(samples, ["a", "b"]), SplitConfig(method="stratified", ratios=[0.5, 0, 0.5]), 1)
    test = Counter(s.label for s in result.subset("test").samples)
    assert test["b"] == 5 and test["a"] == 45


def test_random_split_without_patients_warns_once():
    data = make_set(20)
    with pytest.warns(LeakageWarning, match="patient"):
        assign_splits(data, SplitConfig(method="stratified"), 0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", LeakageWarning)
        assign_splits(data, SplitConfig(method="stratified"), 0)


def test_grouped_split_has_no_patient_in_two_splits():
    data = make_set(120, slices_per_patient=4)
    result = assign_splits(data, SplitConfig(method="grouped", ratios=[0.6, 0.2, 0.2]), seed=3)
    split_of = {}
    for s in result.samples:
        assert split_of.setdefault(s.patient_id, s.split) == s.split, f"{s.patient_id} is in two splits"
    counts = split_counts(result)
    assert all(counts[name] > 0 for name in ("train", "val", "test"))
    assert {s.label for s in result.subset("test").samples} == {"COVID", "normal"}


def test_auto_prefers_predefined_then_grouped():
    predefined = SampleSet(
        [s.with_split("test" if i % 4 == 0 else "train") for i, s in enumerate(make_set(20).samples)],
        ["COVID", "normal"],
    )
    result = assign_splits(predefined, SplitConfig(method="auto", ratios=[0.8, 0.0, 0.2]), 0)
    assert [s.split for s in result.samples] == [s.split for s in predefined.samples]
    grouped = assign_splits(make_set(40, slices_per_patient=5), SplitConfig(method="auto"), 0)
    assert len({(s.patient_id, s.split) for s in grouped.samples}) == len({s.patient_id for s in grouped.samples})


def test_predefined_without_val_carves_val_from_train_only():
    data = SampleSet(
        [s.with_split("test" if i % 5 == 0 else "train") for i, s in enumerate(make_set(50).samples)],
        ["COVID", "normal"],
    )
    result = assign_splits(data, SplitConfig(method="predefined", ratios=[0.8, 0.1, 0.1]), 0)
    for before, after in zip(data.samples, result.samples):
        assert (before.split == "test") == (after.split == "test")
    assert split_counts(result)["val"] > 0


def test_predefined_with_missing_split_names_the_file():
    data = make_set(5)
    with pytest.raises(DataError, match=r"COVID \(0\)\.png"):
        assign_splits(data, SplitConfig(method="predefined"), 0)


def test_same_seed_same_split_other_seed_differs():
    data = make_set(60)
    config = SplitConfig(method="stratified")
    first = [s.split for s in assign_splits(data, config, 7).samples]
    assert first == [s.split for s in assign_splits(data, config, 7).samples]
    assert first != [s.split for s in assign_splits(data, config, 8).samples]


@pytest.mark.parametrize("patients", [None, 3])
def test_kfold_test_folds_partition_the_data(patients):
    data = make_set(30, slices_per_patient=patients)
    seen = Counter()
    for fold in range(5):
        result = assign_splits(data, SplitConfig(method="kfold", folds=5, fold=fold, ratios=[0.8, 0.1, 0.1]), 0)
        test = result.subset("test").samples
        seen.update(s.path for s in test)
        assert split_counts(result)["val"] > 0
        if patients:
            test_patients = {s.patient_id for s in test}
            assert not test_patients & {s.patient_id for s in result.samples if s.split != "test"}
    assert len(seen) == 60 and set(seen.values()) == {1}


def test_save_load_roundtrip_and_file_method(tmp_path):
    data = make_set(20, slices_per_patient=2)
    result = assign_splits(data, SplitConfig(method="grouped"), 0)
    path = save_splits(result, tmp_path / "run" / "splits.csv")
    loaded = load_splits(path)
    assert loaded.samples == result.samples
    reused = assign_splits(data, SplitConfig(method="file", file=str(path)), seed=99)
    assert reused.samples == result.samples


def test_file_method_rejects_samples_missing_from_file(tmp_path):
    data = SampleSet([s.with_split("train") for s in make_set(10).samples], ["COVID", "normal"])
    path = save_splits(SampleSet(data.samples[:5], data.class_names), tmp_path / "splits.csv")
    with pytest.raises(DataError, match="not in this splits file"):
        assign_splits(data, SplitConfig(method="file", file=str(path)), 0)


def test_load_splits_rejects_bad_split_names(tmp_path):
    path = tmp_path / "splits.csv"
    path.write_text("path,label,patient_id,split\na.png,COVID,,train\nb.png,COVID,,holdout\n")
    with pytest.raises(DataError, match="line 3"):
        load_splits(path)


def test_grouped_without_patients_is_an_error():
    with pytest.raises(DataError, match="patient"):
        assign_splits(make_set(10), SplitConfig(method="grouped"), 0)
