"""The reader registry: which reader takes which path, a new format in one registration, and the
checks every reader shares (read limits before decoding, finite pixels, EXIF, DICOM series)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covidscan.config import ReadLimits, config_from_dict
from covidscan.data import (
    DataError,
    Reader,
    find_reader,
    group_dicom_series,
    is_supported_file,
    list_inputs,
    list_readers,
    load_samples,
    read_dicom_series,
    read_image,
    read_volume,
    register_reader,
    unregister_reader,
)
from covidscan.data.readers import Header, LimitError, NonFiniteError
from covidscan.data.synthetic import write_dicom_series, write_dicom_slice
from helpers import (
    bomb_png_bytes,
    truncated_jpeg_bytes,
    write_dicom_with_slope,
    write_exif_rotated_jpeg,
    write_image_folder,
    write_nan_tiff,
)


class NpyReader(Reader):
    """A test format: a 2D ``.npy`` array of values in [0, 1]."""

    name = "npy-test"

    def verify_suffix(self, path: Path) -> bool:
        return path.suffix == ".npy"

    def read_header(self, path: Path, limits: ReadLimits) -> Header:
        array = np.load(path, mmap_mode="r")
        return Header((1, *array.shape), is_hu=False)

    def decode(self, path: Path, header: Header, limits: ReadLimits) -> np.ndarray:
        return np.load(path).astype(np.float32)[None]


@pytest.fixture
def npy_reader():
    register_reader(NpyReader)
    yield
    unregister_reader(NpyReader.name)


def test_builtin_readers_by_path(tmp_path):
    series = tmp_path / "series"
    write_dicom_series(series, np.zeros((2, 8, 8)) - 1000.0)
    (tmp_path / "scan.nii.gz").write_bytes(b"")
    expected = {
        tmp_path / "a.PNG": "image",
        tmp_path / "b.jpeg": "image",
        tmp_path / "c.tif": "image",
        series / "slice_0000.dcm": "dicom",
        series: "dicom-series",
        tmp_path / "scan.nii.gz": "nifti",
    }
    for path in expected:
        if not path.exists():
            path.write_bytes(b"x")
    assert {path: getattr(find_reader(path), "name", None) for path in expected} == expected
    assert find_reader(tmp_path / "notes.txt") is None
    assert set(list_readers()) >= {"image", "dicom", "dicom-series", "nifti"}


def test_a_new_format_is_one_reader_and_one_registration(tmp_path, npy_reader):
    root = write_image_folder(tmp_path / "data", {"COVID": 2, "normal": 2})
    for label, value in (("COVID", 0.9), ("normal", 0.1)):
        np.save(root / label / "extra.npy", np.full((8, 8), value))
    assert is_supported_file(root / "COVID" / "extra.npy")
    assert len(list_inputs([root])) == 6
    data = load_samples(root)  # discovered and header-checked through the new reader
    assert data.class_counts() == {"COVID": 3, "normal": 3}
    assert read_image(root / "COVID" / "extra.npy")[0, 0] == pytest.approx(0.9)
    with pytest.raises(LimitError, match=r"extra\.npy: declared size"):  # limits apply without any code in the reader
        read_image(root / "COVID" / "extra.npy", limits=ReadLimits(max_side=4))


def test_readers_registered_later_are_asked_first(tmp_path, npy_reader):
    class PngOverride(NpyReader):
        name = "png-override"

        def verify_suffix(self, path: Path) -> bool:
            return path.suffix == ".png"

    path = tmp_path / "a.png"
    Image.new("L", (4, 4)).save(path)
    register_reader(PngOverride)
    try:
        assert find_reader(path).name == "png-override"
        with pytest.raises(ValueError, match="already registered"):
            register_reader(PngOverride)
    finally:
        unregister_reader("png-override")
    assert find_reader(path).name == "image"


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png_bytes(30000))
    with pytest.raises(LimitError, match=r"bomb\.png: declared image size is too large"):
        read_image(bomb)
    big = tmp_path / "big.png"
    big.write_bytes(bomb_png_bytes(5000))  # 25 M pixels: within Pillow's guard, above a tighter limit
    with pytest.raises(LimitError, match=r"big\.png: declared size 5000x5000 px exceeds 1,000,000 pixels"):
        read_image(big, limits=ReadLimits(max_pixels=1_000_000))
    with pytest.raises(LimitError, match="file limit"):
        read_image(big, limits=ReadLimits(max_file_bytes=10))


def test_volume_limits_slices_and_decoded_size(tmp_path):
    series = tmp_path / "s"
    write_dicom_series(series, np.zeros((5, 8, 8)) - 1000.0)
    with pytest.raises(LimitError, match="5 DICOM files exceed the 4 slice limit"):
        read_volume(series, limits=ReadLimits(max_slices=4))
    with pytest.raises(LimitError, match="max_decoded_bytes"):
        read_volume(series, limits=ReadLimits(max_decoded_bytes=1000))
    assert read_volume(series).hu.shape == (5, 8, 8)


def test_limits_come_from_the_config():
    assert config_from_dict({"data": {"limits": {"max_side": 512}}}).data.limits == ReadLimits(max_side=512)


def test_truncated_jpeg_is_a_data_error_naming_the_file(tmp_path):
    path = tmp_path / "cut.jpg"
    path.write_bytes(truncated_jpeg_bytes())
    with pytest.raises(DataError, match=r"cut\.jpg: unreadable or corrupt image .*truncated"):
        read_image(path)


def test_non_finite_pixels_and_rescale_values_are_refused(tmp_path):
    with pytest.raises(NonFiniteError, match=r"nan\.tif: float image with 9 NaN"):
        read_image(write_nan_tiff(tmp_path / "nan.tif"))
    with pytest.raises(NonFiniteError, match=r"slope-nan\.dcm: RescaleSlope is nan"):
        read_image(write_dicom_with_slope(tmp_path / "slope-nan.dcm", b"NaN"))
    with pytest.raises(DataError, match=r"slope-abc\.dcm: RescaleSlope 'abc' is not a number"):
        read_image(write_dicom_with_slope(tmp_path / "slope-abc.dcm", b"abc"))


def test_exif_orientation_is_applied(tmp_path):
    upright = write_exif_rotated_jpeg(tmp_path / "photo.jpg")
    pixels = read_image(tmp_path / "photo.jpg")
    assert pixels.shape == upright.shape == (48, 24)
    assert np.abs(pixels - upright).max() < 0.1  # JPEG noise only


def test_unreadable_paths_are_named_clearly(tmp_path):
    loop = tmp_path / "loop.png"
    loop.symlink_to(loop)
    with pytest.raises(DataError, match=r"loop\.png: symbolic link loop"):
        read_image(loop)
    dangling = tmp_path / "dangling.png"
    dangling.symlink_to(tmp_path / "gone.png")
    with pytest.raises(DataError, match=r"dangling\.png: broken symbolic link"):
        read_image(dangling)
    with pytest.raises(DataError, match="broken symbolic link or symlink loop"):
        list_inputs([loop])


def two_series_folder(folder: Path) -> Path:
    folder.mkdir()
    study = {"study_uid": "1.2.3"}
    for k in range(3):
        write_dicom_slice(folder / f"a{k}.dcm", np.zeros((8, 8)) - 1000.0, 2.0 * k, series_uid="1.2.3.1", **study)
    for k in range(2):
        write_dicom_slice(folder / f"b{k}.dcm", np.zeros((8, 8)) - 500.0, 2.0 * k + 1, series_uid="1.2.3.2", **study)
    return folder


def test_a_folder_mixing_two_series_is_refused_naming_the_uids(tmp_path):
    folder = two_series_folder(tmp_path / "mixed")
    with pytest.raises(
        DataError, match=r"2 DICOM series in one folder .*1\.2\.3\.1 \(3 files\), 1\.2\.3\.2 \(2 files\)"
    ):
        read_volume(folder)


def test_group_dicom_series_describes_each_series(tmp_path):
    folder = two_series_folder(tmp_path / "study")
    write_dicom_slice(folder / "report.dcm", None, 0.0, series_uid="1.2.3.9", study_uid="1.2.3")  # no image
    series = group_dicom_series(folder)
    assert [(s.series_uid, s.num_slices, s.modality, s.plane) for s in series] == [
        ("1.2.3.1", 3, "CT", "axial"),
        ("1.2.3.2", 2, "CT", "axial"),
        ("1.2.3.9", 0, "CT", "unknown"),
    ]
    first = series[0]
    assert first.study_uid == "1.2.3" and first.patient_id == "SYNTHETIC-001"
    assert first.is_axial_ct and [f.name for f in first.files] == ["a0.dcm", "a1.dcm", "a2.dcm"]
    assert first.to_dict()["num_slices"] == 3
    volume = read_dicom_series(first.files)  # the chosen series is read from its files
    assert volume.hu.shape == (3, 8, 8) and volume.hu.max() == pytest.approx(-1000.0)
    (folder / "junk.dcm").write_bytes(b"not dicom")
    with pytest.raises(DataError, match=r"junk\.dcm: not a readable DICOM"):
        group_dicom_series(folder)
    assert len(group_dicom_series(folder, skip_bad=True)) == 3


def test_a_dicom_header_complaint_shows_once_through_the_python_api(tmp_path, caplog):
    """De-identified exports carry UUIDs as UIDs, so pydicom logs and warns "Invalid value for VR UI" for
    every file (here each file has its own). Read through the Python API, no CLI, it shows once, with the
    first file's value, as a log line and as a warning; the same text warned by anyone else still shows."""
    import uuid
    import warnings

    from pydicom import config as pydicom_config

    from covidscan.notices import reset_warnings

    folder = tmp_path / "deidentified"
    folder.mkdir()
    uids = [str(uuid.uuid4()) for _ in range(4)]
    air = np.zeros((8, 8)) - 1000.0
    previous = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE  # write a UUID as a UID, as exporters do
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # making the UID complains already
            for k, uid in enumerate(uids):
                write_dicom_slice(folder / f"s{k}.dcm", air, 2.0 * k, study_uid=uid, series_uid="1.2.3")
    finally:
        pydicom_config.settings.writing_validation_mode = previous
    reset_warnings()  # making them went through the fold too, once a read had installed it
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # record every warning issued, not only the first of each text
        assert read_dicom_series(folder).hu.shape == (4, 8, 8)
        assert len(group_dicom_series(folder)) == 1
        for _ in range(2):
            warnings.warn("Invalid value for VR UI: 'not from pydicom'", UserWarning, stacklevel=1)
    warned = [str(w.message) for w in caught if "Invalid value for VR" in str(w.message)]
    logged = [r.getMessage() for r in caplog.records if "Invalid value for VR" in r.getMessage()]
    assert len(logged) == 1 and uids[0] in logged[0]
    assert warned == [logged[0], *["Invalid value for VR UI: 'not from pydicom'"] * 2]
