"""Several data sources at once: config forms, Sample.source, per-source label maps, splits by
source, per-source counts in `data info`, and configs restricted to some sources."""

from __future__ import annotations

from collections import Counter

import pytest

from covidscan.cli import main
from covidscan.config import ConfigError, SourceConfig, SplitConfig, config_from_dict
from covidscan.data import assign_splits, load_samples, load_splits, save_splits, select_sources
from helpers import write_image_folder


@pytest.fixture
def two_sources(tmp_path):
    """Hospital A: folders COVID / non-COVID; hospital B: CT_COVID / CT_NonCOVID with a manifest and patients."""
    a = write_image_folder(tmp_path / "hospital-a", {"COVID": 12, "non-COVID": 8}, size=16)
    b = write_image_folder(tmp_path / "hospital-b", {"CT_COVID": 10, "CT_NonCOVID": 10}, size=16, seed=1)
    rows = ["path,label,patient_id"]
    for label in ("CT_COVID", "CT_NonCOVID"):
        rows += [f"{label}/{label} ({i}).png,{label},p{i // 2}" for i in range(10)]  # ids repeat across labels
    (b / "meta.csv").write_text("\n".join(rows) + "\n")
    return a, b / "meta.csv"


def b_source(manifest) -> SourceConfig:
    return SourceConfig(path=str(manifest), name="b", label_map={"CT_COVID": "COVID", "CT_NonCOVID": "non-COVID"})


def test_max_per_class_caps_each_source_so_every_source_stays(two_sources):
    a, manifest = two_sources
    data = load_samples([str(a), b_source(manifest)], max_per_class=3)
    assert data.source_class_counts() == {
        "hospital-a": {"COVID": 3, "non-COVID": 3},
        "b": {"COVID": 3, "non-COVID": 3},
    }


def test_max_per_class_draws_across_patients_not_the_first_files(tmp_path):
    root = write_image_folder(tmp_path / "data", {"COVID": 40, "normal": 40}, size=8)
    rows = ["path,label,patient_id"]
    for label in ("COVID", "normal"):
        rows += [f"{label}/{label} ({i}).png,{label},{label}-p{i // 10}" for i in range(40)]  # 4 patients x 10
    (root / "meta.csv").write_text("\n".join(rows) + "\n")
    capped = load_samples(str(root / "meta.csv"), max_per_class=10)
    assert Counter(s.label for s in capped.samples) == {"COVID": 10, "normal": 10}
    assert len({s.patient_id for s in capped.samples if s.label == "COVID"}) > 1  # not one patient's slices
    again = load_samples(str(root / "meta.csv"), max_per_class=10)
    assert [s.path for s in again.samples] == [s.path for s in capped.samples]  # the same subset every time


def test_config_accepts_a_list_of_sources_and_keeps_the_string_form():
    single = config_from_dict({"data": {"source": "data/x.csv"}}).data
    assert single.source == "data/x.csv" and [(s.name, s.path) for s in single.sources] == [("data", "data/x.csv")]
    several = config_from_dict(
        {"data": {"source": ["a/sarscov2-ct", {"path": "b/covid-ct", "label_map": {"CT_COVID": "COVID"}}]}}
    ).data
    assert [s.name for s in several.sources] == ["sarscov2-ct", "covid-ct"]
    assert several.sources[1].label_map == {"CT_COVID": "COVID"}
    test = config_from_dict({"data": {"test_source": ["x/c", "y/d"]}}).data
    assert [s.name for s in test.test_sources] == ["c", "d"]
    with pytest.raises(ConfigError, match="several sources are named"):
        config_from_dict({"data": {"source": ["a/x", "b/x"]}})
    with pytest.raises(ConfigError, match=r"data.source.0.label_map must be a mapping"):
        config_from_dict({"data": {"source": [{"path": "a", "label_map": 3}]}})
    saved = config_from_dict({"data": {"source": ["a/x"]}}).to_dict()
    assert config_from_dict(saved).data.sources == [SourceConfig(path="a/x", name="x")]  # round trip


def test_samples_carry_their_source_and_label_maps_line_up(two_sources):
    a, manifest = two_sources
    single = load_samples(a)
    assert {s.source for s in single.samples} == {"hospital-a"}
    data = load_samples([str(a), b_source(manifest)])
    assert data.class_names == ["COVID", "non-COVID"]
    assert data.source_class_counts() == {
        "hospital-a": {"COVID": 12, "non-COVID": 8},
        "b": {"COVID": 10, "non-COVID": 10},
    }
    global_map = load_samples([str(a), b_source(manifest)], label_map={"non-COVID": "normal"})
    assert global_map.class_names == ["COVID", "normal"]  # the source's map first, then data.label_map


def test_splits_csv_keeps_the_source_and_old_files_still_load(two_sources, tmp_path):
    a, manifest = two_sources
    data = assign_splits(load_samples([str(a), b_source(manifest)]), SplitConfig(method="stratified"), seed=0)
    path = save_splits(data, tmp_path / "splits.csv")
    assert path.read_text().splitlines()[0] == "path,label,patient_id,split,source"
    assert [s.source for s in load_splits(path).samples] == [s.source for s in data.samples]
    old = tmp_path / "old.csv"
    old.write_text("path,label,patient_id,split\nx.png,COVID,,train\n")
    assert load_splits(old).samples[0].source is None


def test_stratify_by_source_keeps_each_sources_class_mix(two_sources):
    a, manifest = two_sources
    data = load_samples([str(a), b_source(manifest)])
    split = SplitConfig(method="stratified", ratios=[0.5, 0, 0.5], stratify_by_source=True)
    result = assign_splits(data, split, seed=3)
    cells = Counter((s.source, s.label, s.split) for s in result.samples)
    for source, counts in data.source_class_counts().items():
        for label, count in counts.items():
            assert cells[(source, label, "test")] == count // 2  # every source x class halved


def test_patients_are_grouped_within_their_source(two_sources, tmp_path):
    _, manifest = two_sources
    other = tmp_path / "hospital-c"
    write_image_folder(other, {"CT_COVID": 4, "CT_NonCOVID": 4}, size=16, seed=2)
    (other / "meta.csv").write_text(
        "path,label,patient_id\n"
        + "".join(f"{lab}/{lab} ({i}).png,{lab},p{i}\n" for lab in ("CT_COVID", "CT_NonCOVID") for i in range(4))
    )
    c = SourceConfig(path=str(other / "meta.csv"), name="c", label_map=b_source(manifest).label_map)
    data = load_samples([b_source(manifest), c])  # b has patients p0..p4, c has p0..p3: 9 people, 5 ids
    result = assign_splits(data, SplitConfig(method="grouped", ratios=[0.5, 0, 0.5]), seed=0)
    by_patient: dict[tuple, set] = {}
    for s in result.samples:
        by_patient.setdefault((s.source, s.patient_id), set()).add(s.split)
    assert all(len(splits) == 1 for splits in by_patient.values())  # no patient in two splits
    # nine folds need nine groups: grouping by the bare id across sources would give only five
    folds = [
        assign_splits(data, SplitConfig(method="kfold", folds=9, fold=k, ratios=[0.5, 0, 0.5]), seed=0)
        for k in range(9)
    ]
    test_patients = [{(s.source, s.patient_id) for s in f.samples if s.split == "test"} for f in folds]
    assert all(len(patients) == 1 for patients in test_patients)
    assert set().union(*test_patients) == set(by_patient)


def test_single_source_splits_are_unchanged_by_the_source_tag(two_sources):
    a, _ = two_sources
    data = load_samples(a)
    untagged = type(data)([s.__class__(s.path, s.label) for s in data.samples], data.class_names)
    for method in ("stratified", "kfold"):
        config = SplitConfig(method=method)
        assert [s.split for s in assign_splits(data, config, 7).samples] == [
            s.split for s in assign_splits(untagged, config, 7).samples
        ]


def test_select_sources_for_leave_one_source_out(two_sources):
    a, manifest = two_sources
    config = config_from_dict({"data": {"source": [{"path": str(a), "name": "a"}, b_source(manifest).__dict__]}})
    held_out = select_sources(config, ["a"], test=["b"])
    assert [s.name for s in held_out.data.sources] == ["a"] and [s.name for s in held_out.data.test_sources] == ["b"]
    assert [s.name for s in config.data.sources] == ["a", "b"]  # the original is untouched
    with pytest.raises(ConfigError, match=r"unknown source\(s\) \['c'\]; data.source names are \['a', 'b'\]"):
        select_sources(config, ["c"])


def test_data_info_prints_per_source_counts(two_sources, tmp_path, capsys):
    a, manifest = two_sources
    config = tmp_path / "run.yaml"
    b_map = "{CT_COVID: COVID, CT_NonCOVID: non-COVID}"
    config.write_text(f"data:\n  source:\n    - {a}\n    - {{path: {manifest}, name: b, label_map: {b_map}}}\n")
    assert main(["data", "info", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "source:   hospital-a + b" in out
    assert "hospital-a      20  (COVID: 12, non-COVID: 8; no patient ids)" in out
    assert "b               20  (COVID: 10, non-COVID: 10; 5 patients)" in out
    config.write_text(config.read_text() + "  max_per_class: 9\n")  # what the run trains on
    assert main(["data", "info", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "samples:  35 (data.max_per_class: 9 per class and source)" in out
    assert "hospital-a      17  (COVID: 9, non-COVID: 8; no patient ids)" in out


def test_data_info_reads_its_config_once(two_sources, tmp_path, monkeypatch, capsys):
    import covidscan.config

    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  source: {two_sources[0]}\n  max_per_class: 9\n")
    read, load = [], covidscan.config.load_config
    monkeypatch.setattr(covidscan.config, "load_config", lambda path: read.append(path) or load(path))
    assert main(["data", "info", "--config", str(config)]) == 0
    assert "(data.max_per_class: 9 per class and source)" in capsys.readouterr().out
    assert read == [str(config)]


@pytest.mark.integration
def test_real_datasets_as_two_sources(shared_datasets, tmp_path):
    sources = [
        SourceConfig(path=str(shared_datasets / "sarscov2-ct")),
        SourceConfig(
            path=str(shared_datasets / "covid-ct"), label_map={"CT_COVID": "COVID", "CT_NonCOVID": "non-COVID"}
        ),
    ]
    data = load_samples(sources, check_files="none")
    assert data.source_class_counts() == {
        "sarscov2-ct": {"COVID": 1252, "non-COVID": 1229},
        "covid-ct": {"COVID": 349, "non-COVID": 397},
    }
    split = assign_splits(data, SplitConfig(method="stratified", stratify_by_source=True), seed=0)
    tests = Counter((s.source, s.label) for s in split.samples if s.split == "test")
    for (source, label), count in tests.items():
        assert count == pytest.approx(0.1 * data.source_class_counts()[source][label], abs=1)


@pytest.mark.integration
def test_real_manifest_and_folder_split_grouped_by_patient_and_source(shared_datasets):
    config = config_from_dict(
        {
            "data": {
                "source": [
                    {
                        "name": "covid-ct",
                        "path": str(shared_datasets / "covid-ct" / "metadata.csv"),
                        "label_map": {"NonCOVID": "non-COVID"},
                    },
                    {"name": "sarscov2-ct", "path": str(shared_datasets / "sarscov2-ct")},
                ],
                "split": {"method": "grouped", "stratify_by_source": True},
            }
        }
    ).data
    data = load_samples(config.sources, check_files="none")
    assert data.class_names == ["COVID", "non-COVID"]
    split = assign_splits(data, config.split, seed=0)
    where: dict[tuple, set] = {}
    for s in split.samples:
        if s.patient_id:
            where.setdefault((s.source, s.patient_id), set()).add(s.split)
    assert where and all(len(splits) == 1 for splits in where.values())  # no covid-ct patient in two splits
    present = Counter((s.split, s.source, s.label) for s in split.samples)
    for part in ("train", "val", "test"):
        for source in ("covid-ct", "sarscov2-ct"):
            assert all(present[(part, source, label)] > 0 for label in data.class_names), (part, source)
