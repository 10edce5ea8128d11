"""Sources and readers: folder trees, manifests, DICOM, NIfTI, and every bad-input error path."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from covidscan.cli import main
from covidscan.data import load_samples, read_dicom, read_dicom_series, read_image, read_nifti, read_volume
from covidscan.data.io import read_middle_slice
from covidscan.data.records import DataError
from covidscan.data.sources import parse_label_map
from covidscan.data.synthetic import write_dicom_series, write_dicom_slice
from helpers import write_image_folder


def test_folder_names_with_spaces_and_parentheses(tmp_path):
    root = write_image_folder(tmp_path / "data", {"COVID": 3, "non-COVID": 2})
    data = load_samples(root)
    assert data.class_names == ["COVID", "non-COVID"] and data.class_counts() == {"COVID": 3, "non-COVID": 2}
    assert any(s.path.endswith("COVID (0).png") for s in data.samples)
    assert read_image(data.samples[0].path).shape == (32, 32)


def test_empty_class_folder_is_an_error_or_skipped(tmp_path):
    root = write_image_folder(tmp_path / "data", {"a": 2, "b": 2})
    (root / "empty").mkdir()
    with pytest.raises(DataError, match="'empty' holds no images"):
        load_samples(root)
    data = load_samples(root, skip_bad=True)
    assert data.skipped == [(str(root / "empty"), "empty class folder")]


def test_single_class_is_an_error(tmp_path):
    with pytest.raises(DataError, match="only one class"):
        load_samples(write_image_folder(tmp_path / "data", {"COVID": 3}))


def test_unknown_extension_is_an_error_or_skipped_and_listed(tmp_path):
    root = write_image_folder(tmp_path / "data", {"a": 2, "b": 2})
    (root / "a" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"notes\.txt: unknown file type"):
        load_samples(root)
    data = load_samples(root, skip_bad=True)
    assert len(data.samples) == 4 and data.skipped[0][0].endswith("notes.txt")


def test_split_folder_tree_keeps_its_splits(tmp_path):
    write_image_folder(tmp_path / "data" / "train", {"Covid": 3, "Normal": 3})
    write_image_folder(tmp_path / "data" / "test", {"Covid": 1, "Normal": 2})
    write_image_folder(tmp_path / "data" / "Validation", {"Covid": 1, "Normal": 1})
    data = load_samples(tmp_path / "data")
    assert data.class_names == ["Covid", "Normal"]
    assert sorted({s.split for s in data.samples}) == ["test", "train", "val"]
    assert sum(s.split == "test" for s in data.samples) == 3


def test_manifest_missing_file_names_csv_line(tmp_path):
    root = write_image_folder(tmp_path / "data", {"a": 2, "b": 2})
    manifest = tmp_path / "data" / "manifest.csv"
    manifest.write_text(
        "path,label,patient_id,split\na/a (0).png,a,p1,Train\nb/gone.png,b,p2,test\nb/b (0).png,b,p3,validation\n"
    )
    with pytest.raises(DataError, match=r"manifest\.csv, line 3: file not found"):
        load_samples(manifest)
    data = load_samples(manifest, skip_bad=True)
    assert [s.patient_id for s in data.samples] == ["p1", "p3"] and data.skipped[0][0] == str(root / "b" / "gone.png")
    assert [s.split for s in data.samples] == ["train", "val"]


def test_manifest_column_aliases_and_label_map(tmp_path):
    write_image_folder(tmp_path / "data", {"CT_COVID": 2, "CT_NonCOVID": 2})
    manifest = tmp_path / "data" / "meta.csv"
    manifest.write_text(
        "Filename,Class,Patient\nCT_COVID/CT_COVID (0).png,CT_COVID,x\nCT_NonCOVID/CT_NonCOVID (1).png,CT_NonCOVID,y\n"
    )
    data = load_samples(manifest, label_map=parse_label_map(["CT_COVID=COVID", "CT_NonCOVID=non-COVID"]))
    assert data.class_names == ["COVID", "non-COVID"] and [s.patient_id for s in data.samples] == ["x", "y"]
    bad = tmp_path / "bad.csv"
    bad.write_text("image_id,finding\n1,COVID\n")
    with pytest.raises(DataError, match=r"lacks column\(s\) \['path', 'label'\]"):
        load_samples(bad)
    with pytest.raises(DataError, match="RAW=CLASS"):
        parse_label_map(["COVID"])


def test_corrupt_image_error_names_file(tmp_path):
    broken = tmp_path / "Covid (7).jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(DataError, match=r"Covid \(7\)\.jpg: unreadable or corrupt image"):
        read_image(broken)


def test_sixteen_bit_png_scales_to_unit_range(tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(path)
    assert read_image(path).max() == pytest.approx(1.0)


def test_dicom_without_pixel_data_is_an_error(tmp_path):
    path = write_dicom_slice(tmp_path / "report.dcm", None, 0.0)
    with pytest.raises(DataError, match=r"report\.dcm: DICOM has no pixel data"):
        read_dicom(path)
    assert read_dicom(path, pixels=False).position == 0.0


def test_dicom_series_sorted_by_position_with_hu_rescale(tmp_path):
    depth = 6
    hu = np.stack([np.full((16, 16), -1000.0 + 150 * k) for k in range(depth)])
    hu[:, 4:8, 4:8] = 40.0  # soft tissue patch
    shuffled = np.random.default_rng(0).permutation(depth)
    write_dicom_series(tmp_path / "series", hu, slice_gap=2.0, file_order=shuffled, intercept=-1024.0, slope=1.0)
    volume = read_dicom_series(tmp_path / "series")
    np.testing.assert_allclose(volume.hu, hu)  # anatomical order restored, stored values rescaled to HU
    assert volume.spacing == (2.0, 0.7, 0.7)
    assert read_volume(tmp_path / "series").hu.shape == (depth, 16, 16)
    middle, shape = read_middle_slice(tmp_path / "series")
    assert shape == (depth, 16, 16)
    np.testing.assert_allclose(middle, hu[depth // 2])


def test_dicom_series_with_mixed_slice_sizes_is_an_error(tmp_path):
    write_dicom_slice(tmp_path / "a.dcm", np.zeros((8, 8)), 0.0, series_uid="1.2.3")
    write_dicom_slice(tmp_path / "b.dcm", np.zeros((8, 6)), 1.0, series_uid="1.2.3")
    with pytest.raises(DataError, match=r"b\.dcm: slice size"):
        read_dicom_series(tmp_path)
    assert read_dicom_series(tmp_path, pixels=False).hu.shape == (2, 0, 0)


def test_dicom_slope_other_than_one(tmp_path):
    hu = np.array([[-1000.0, 0.0], [500.0, 1000.0]])
    path = write_dicom_slice(tmp_path / "a.dcm", hu, 0.0, intercept=-2048.0, slope=2.0)
    np.testing.assert_allclose(read_dicom(path).pixels, hu)
    windowed = read_image(path)  # lung window (-600, 1500): -1350 .. 150 HU -> 0 .. 1
    assert windowed[0, 0] == pytest.approx(350 / 1500) and windowed[1, 1] == 1.0


def test_nifti_volume_is_slices_first_with_spacing(tmp_path):
    import nibabel as nib

    data = np.random.default_rng(0).normal(size=(10, 12, 5)).astype(np.float32)  # (x, y, z)
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.9, 3.0, 1.0])), str(path))
    volume = read_nifti(path)
    assert volume.shape == (5, 12, 10)
    assert volume[3, 7, 2] == pytest.approx(data[2, 7, 3])
    assert read_volume(path).spacing == pytest.approx((3.0, 0.9, 0.8))
    middle, shape = read_middle_slice(path)
    assert shape == (5, 12, 10)
    np.testing.assert_array_equal(middle, volume[2])
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"nonsense")
    with pytest.raises(DataError, match=r"broken\.nii\.gz: not a readable NIfTI"):
        read_nifti(broken)


def test_cli_info_split_sample(tmp_path, capsys):
    assert main(["data", "sample", str(tmp_path / "demo"), "--patients", "3", "--slices", "2", "--size", "32"]) == 0
    manifest = tmp_path / "demo" / "manifest.csv"
    assert main(["data", "info", str(manifest)]) == 0
    assert "patients: 6" in capsys.readouterr().out
    out = tmp_path / "splits.csv"
    assert main(["data", "split", str(manifest), "--out", str(out), "--ratios", "0.5", "0.5", "0"]) == 0
    assert out.read_text().startswith("path,label,patient_id,split")
    assert main(["data", "split", str(manifest), "--out", str(out), "--ratios", "0.5", "0.6", "0"]) == 2
    assert "--ratios must sum to 1" in capsys.readouterr().err
