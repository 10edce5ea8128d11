"""Leakage audit: planted duplicates and near-duplicates across splits are found; clean data is clean."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
from PIL import Image

from covidscan.cli import main
from covidscan.config import SplitConfig
from covidscan.data.audit import audit_samples, check_split_leakage
from covidscan.data.records import DataError, Sample, SampleSet
from covidscan.data.splits import LeakageWarning, assign_splits, save_splits


def _blobs(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """Distinct smooth structures, so unrelated images are far apart in perceptual hash."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = np.zeros((size, size))
    for _ in range(6):
        cx, cy, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.2)
        image += rng.uniform(0.3, 1) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
    return (255 * image / image.max()).astype(np.uint8)


@pytest.fixture
def planted(tmp_path):
    """Train/test images where test holds one exact copy and one brightened copy of train images."""
    rng = np.random.default_rng(0)
    samples = []
    for label in ("COVID", "normal"):
        (tmp_path / label).mkdir()
        for i in range(8):
            path = tmp_path / label / f"{label} ({i}).png"
            Image.fromarray(_blobs(rng)).save(path)
            samples.append(Sample(str(path), label, split="test" if i >= 6 else "train"))
    exact = tmp_path / "COVID" / "copy of (0).png"
    shutil.copy(samples[0].path, exact)
    near = tmp_path / "normal" / "brighter (1).png"
    pixels = np.asarray(Image.open(samples[9].path), dtype=np.float32)
    Image.fromarray(np.clip(pixels * 0.9 + 12, 0, 255).astype(np.uint8)).save(near)
    samples += [Sample(str(exact), "COVID", split="test"), Sample(str(near), "normal", split="test")]
    return SampleSet(samples, ["COVID", "normal"])


def test_audit_finds_planted_exact_and_near_duplicates_across_splits(planted):
    report = audit_samples(planted, progress=False)
    assert report.exact_duplicates.n_groups == 1
    assert set(report.exact_duplicates.groups[0]) == {planted.samples[0].path, planted.samples[-2].path}
    found = {frozenset((p.a, p.b)) for p in report.near_duplicates.pairs}
    assert frozenset((planted.samples[9].path, planted.samples[-1].path)) in found
    assert report.leakage.test.with_train_near_duplicate == 2
    assert report.leakage.cross_split_near_duplicate_pairs == {"train-test": 2}
    assert report.image_sizes.width_range == [64, 64] and report.modes == {"L": 18}


def test_audit_reports_unreadable_files_without_stopping(planted, tmp_path):
    broken = tmp_path / "COVID" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    data = SampleSet([*planted.samples, Sample(str(broken), "COVID", split="train")], planted.class_names)
    report = audit_samples(data, progress=False)
    assert [item.path for item in report.unreadable] == [str(broken)]
    assert "broken.png" in report.unreadable[0].reason


def test_audit_fingerprints_dicom_series_by_their_middle_slice(tmp_path):
    from covidscan.data.synthetic import write_dicom_series

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        write_dicom_series(tmp_path / "COVID" / name, rng.uniform(-1000, 400, (5, 32, 32)), slice_gap=2.0)
    shutil.copytree(tmp_path / "COVID" / "a", tmp_path / "normal" / "a-copy")
    data = SampleSet(
        [
            Sample(str(tmp_path / "COVID" / "a"), "COVID", "a", "train"),
            Sample(str(tmp_path / "COVID" / "b"), "COVID", "b", "train"),
            Sample(str(tmp_path / "normal" / "a-copy"), "normal", "a-copy", "test"),
        ],
        ["COVID", "normal"],
    )
    report = audit_samples(data, progress=False)
    assert report.image_sizes.most_common[0] == ("5x32x32", 3) and report.modes == {"volume": 3}
    assert report.exact_duplicates.n_groups_with_conflicting_labels == 1
    assert report.leakage.test.with_train_near_duplicate == 1


def test_check_split_leakage_warns_or_refuses(planted, tmp_path):
    with pytest.warns(LeakageWarning, match="2 of 6 test images"):
        findings = check_split_leakage(planted, strict=False, report_path=tmp_path / "leakage.json")
    assert findings.test.with_train_near_duplicate == 2
    assert json.loads((tmp_path / "leakage.json").read_text())["test_size"] == 6
    with pytest.raises(DataError, match="strict"):
        check_split_leakage(planted, strict=True)


def test_check_split_leakage_reports_patients_spanning_splits(planted):
    clean = [s for s in planted.samples if "copy" not in s.path and "brighter" not in s.path]
    shared = [
        Sample(s.path, s.label, patient_id="p1" if i in (0, 7) else f"q{i}", split=s.split) for i, s in enumerate(clean)
    ]
    with pytest.raises(DataError, match="1 patients appear in more than one split"):
        check_split_leakage(SampleSet(shared, planted.class_names), strict=True)


def test_the_same_patient_id_in_two_sources_is_two_patients(planted):
    clean = [s for s in planted.samples if "copy" not in s.path and "brighter" not in s.path]

    def tagged(other_source: str) -> SampleSet:
        samples = [
            Sample(s.path, s.label, patient_id="7" if i in (0, 7) else f"q{i}", split=s.split, source="a")
            for i, s in enumerate(clean)
        ]
        samples[7] = Sample(clean[7].path, clean[7].label, "7", split=clean[7].split, source=other_source)
        return SampleSet(samples, planted.class_names)

    assert check_split_leakage(tagged("b")).patients_spanning_splits == 0  # hospital a's 7 is not hospital b's
    with pytest.warns(LeakageWarning):
        assert check_split_leakage(tagged("a")).patients_spanning_splits == 1


def test_clean_grouped_split_passes_quietly(planted):
    clean = [s for s in planted.samples if "copy" not in s.path and "brighter" not in s.path]
    with_patients = SampleSet([Sample(s.path, s.label, f"p{i}") for i, s in enumerate(clean)], planted.class_names)
    split = assign_splits(with_patients, SplitConfig(method="grouped", ratios=[0.5, 0.25, 0.25]), 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LeakageWarning)
        findings = check_split_leakage(split, strict=True)
    assert findings.patients_spanning_splits == 0


def test_cli_audit_with_splits_file(planted, tmp_path, capsys):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label\n" + "".join(f"{s.path},{s.label}\n" for s in planted.samples))
    splits = save_splits(planted, tmp_path / "splits.csv")
    out = tmp_path / "report" / "audit.json"
    assert main(["data", "audit", str(manifest), "--splits", str(splits), "--out", str(out)]) == 0
    assert "test images with a train near-duplicate: 2/6" in capsys.readouterr().out
    assert json.loads(out.read_text())["leakage"]["test_with_train_near_duplicate"] == 2
    assert out.with_suffix(".png").stat().st_size > 0
    assert main(["data", "audit", str(manifest), "--splits", str(splits), "--strict"]) == 2


def test_hashes_are_cached_per_file_and_refreshed_when_a_file_changes(planted, monkeypatch):
    import covidscan.data.audit as audit

    first = audit.inspect_samples(planted.samples, progress=False)
    calls = []
    original = audit.inspect_sample
    monkeypatch.setattr(audit, "inspect_sample", lambda s, h: calls.append(s.path) or original(s, h))
    again = audit.inspect_samples(planted.samples, progress=False)
    assert calls == []  # everything came from the cache
    assert [(f.sha256, f.size, f.mode, f.phash.tolist()) for f in again] == [
        (f.sha256, f.size, f.mode, f.phash.tolist()) for f in first
    ]
    changed = planted.samples[3].path
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(changed)  # new content, new size and mtime
    refreshed = audit.inspect_samples(planted.samples, progress=False)
    assert calls == [changed]
    assert refreshed[3].sha256 != first[3].sha256
    assert audit.inspect_samples(planted.samples, progress=False, cache=False) and len(calls) == 1 + len(
        planted.samples
    )


def test_hashing_in_worker_processes_gives_the_same_facts(planted, monkeypatch):
    import covidscan.data.audit as audit

    monkeypatch.setattr(audit, "PARALLEL_MIN_IMAGES", 2)
    monkeypatch.setattr(audit, "_WORKER_CHUNK", 5)
    parallel = audit.inspect_samples(planted.samples, progress=False, workers=2, cache=False)
    serial = audit.inspect_samples(planted.samples, progress=False, workers=1, cache=False)
    assert [f.sample.path for f in parallel] == [s.path for s in planted.samples]
    assert [(f.sha256, f.phash.tolist(), f.size, f.error) for f in parallel] == [
        (f.sha256, f.phash.tolist(), f.size, f.error) for f in serial
    ]


def test_an_unusable_cache_is_skipped_with_a_warning(planted, tmp_path, monkeypatch, caplog):
    from covidscan.data.audit import inspect_samples

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("COVIDSCAN_CACHE", str(blocker / "cache"))
    with caplog.at_level("WARNING", logger="covidscan.data.hashcache"):
        facts = inspect_samples(planted.samples, progress=False)
    assert all(f.phash is not None for f in facts)
    assert "hash cache" in caplog.text and "not used" in caplog.text


def test_audit_json_keeps_its_layout(planted, tmp_path):
    """The typed report's to_dict() is the audit.json / leakage.json readers already parse."""
    saved = audit_samples(planted, progress=False).to_dict()
    assert list(saved) == [
        "n_samples",
        "classes",
        "patients",
        "splits",
        "image_sizes",
        "modes",
        "unreadable",
        "skipped_at_load",
        "manifest_issues",
        "exact_duplicates",
        "near_duplicates",
        "leakage",
    ]
    assert set(saved["near_duplicates"]["pairs"][0]) == {"a", "b", "distance"}
    assert saved["leakage"]["test_with_train_near_duplicate"] == 2 and "hash" not in saved["leakage"]
    with pytest.warns(LeakageWarning):
        check_split_leakage(planted, report_path=tmp_path / "leakage.json")
    leakage = json.loads((tmp_path / "leakage.json").read_text())
    assert list(leakage)[:3] == ["hash", "threshold_bits", "cross_split_near_duplicate_pairs"]
    assert leakage["test_examples"] and leakage["val_size"] == 0


def test_cli_audit_strict_applies_the_trainers_leakage_rule(planted, tmp_path, capsys):
    """Patients spanning splits (no near-duplicates) are refused by --strict with the trainer's message."""
    clean = [s for s in planted.samples if "copy" not in s.path and "brighter" not in s.path]
    shared = [Sample(s.path, s.label, "p1" if i in (0, 7) else f"q{i}", s.split) for i, s in enumerate(clean)]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label,patient_id\n" + "".join(f"{s.path},{s.label},{s.patient_id}\n" for s in shared))
    splits = save_splits(SampleSet(shared, planted.class_names), tmp_path / "splits.csv")
    assert main(["data", "audit", str(manifest), "--splits", str(splits)]) == 0
    assert main(["data", "audit", str(manifest), "--splits", str(splits), "--strict"]) == 2
    assert "1 patients appear in more than one split" in capsys.readouterr().err
