"""Reading pixels: 2D images (PNG/JPEG/BMP/TIFF), DICOM files and series, NIfTI volumes.

Everything returns float32 NumPy arrays. CT input (DICOM, NIfTI) is in Hounsfield units until a
window maps it to [0, 1]; 8-bit images are scaled to [0, 1] directly. ``torchvision.io`` is not
used because its decoders need the compiled extension (see ``covidscan.compat``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
from PIL import Image, UnidentifiedImageError

from covidscan.config import WindowConfig
from covidscan.data.records import DataError

if TYPE_CHECKING:
    from nibabel.spatialimages import SpatialImage

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
DICOM_EXTENSIONS = frozenset({".dcm", ".dicom"})
NIFTI_SUFFIXES = (".nii", ".nii.gz")
LUNG_WINDOW = WindowConfig(level=-600.0, width=1500.0)


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def is_supported_file(path: str | Path) -> bool:
    suffix = Path(path).suffix.lower()
    return suffix in IMAGE_EXTENSIONS or suffix in DICOM_EXTENSIONS or is_nifti(path)


def apply_window(hu: np.ndarray, window: WindowConfig = LUNG_WINDOW) -> np.ndarray:
    """Map HU to [0, 1] with a CT window (level/width), clipping outside it."""
    low = window.level - window.width / 2
    return np.clip((hu.astype(np.float32) - low) / window.width, 0.0, 1.0)


def read_image(path: str | Path, window: WindowConfig | None = None) -> np.ndarray:
    """Read one 2D image as grayscale float32 in [0, 1], shape (H, W).

    DICOM and NIfTI are windowed (lung window unless ``window`` says otherwise); a NIfTI or
    multi-frame input must be 2D here: volumes go through :func:`read_volume`.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in DICOM_EXTENSIONS:
        return apply_window(read_dicom(path).pixels, window or LUNG_WINDOW)
    if is_nifti(path):
        volume = read_nifti(path)
        if volume.shape[0] != 1:
            raise DataError(
                f"{path}: NIfTI volume with {volume.shape[0]} slices given where a 2D image was "
                "expected; use a 3D (spatial_dims: 3) config for volumes"
            )
        return apply_window(volume[0], window or LUNG_WINDOW)
    if suffix not in IMAGE_EXTENSIONS:
        raise DataError(
            f"{path}: unknown image extension {suffix!r}; supported: "
            f"{sorted(IMAGE_EXTENSIONS | DICOM_EXTENSIONS)} and .nii/.nii.gz"
        )
    try:
        with Image.open(path) as image:
            image.load()
            return _pil_to_gray(image)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; fix the path or remove it from the manifest") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: unreadable or corrupt image ({exc}); replace the file or pass --skip-bad") from exc


def _pil_to_gray(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float32)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        return np.clip(array / top, 0.0, 1.0)
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float32)
        span = float(array.max() - array.min()) or 1.0
        return (array - array.min()) / span
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


@dataclass
class DicomSlice:
    pixels: np.ndarray  # HU (after RescaleSlope/Intercept), float32 (H, W)
    position: float | None  # z along the slice normal, from ImagePositionPatient or SliceLocation
    modality: str | None
    spacing: tuple[float, float] | None  # (row, column) mm
    thickness: float | None
    orientation: tuple[float, ...] | None


def read_dicom(path: str | Path, *, pixels: bool = True) -> DicomSlice:
    """Read one DICOM file into HU, decoding compressed transfer syntaxes via pylibjpeg."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=not pixels)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: not a readable DICOM file ({exc})") from exc
    orientation = tuple(float(v) for v in ds.ImageOrientationPatient) if "ImageOrientationPatient" in ds else None
    array = np.zeros((0, 0), np.float32)
    if pixels:
        if "PixelData" not in ds:
            raise DataError(
                f"{path}: DICOM has no pixel data (a report or structured object?); remove it "
                "from the dataset or pass --skip-bad"
            )
        try:
            raw = ds.pixel_array
        except Exception as exc:  # pydicom raises many types for missing/broken codecs
            raise DataError(
                f"{path}: cannot decode DICOM pixels (transfer syntax "
                f"{getattr(ds.file_meta, 'TransferSyntaxUID', '?')}): {exc}. Compressed CT needs "
                "pylibjpeg + pylibjpeg-libjpeg (installed with covidscan)"
            ) from exc
        if raw.ndim == 3 and ds.get("SamplesPerPixel", 1) == 3:
            raw = raw.mean(axis=-1)
        if raw.ndim != 2:
            raise DataError(f"{path}: expected a single-frame 2D DICOM, got pixel array shape {raw.shape}")
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        array = raw.astype(np.float32) * slope + intercept
    return DicomSlice(
        pixels=array,
        position=_slice_position(ds, orientation),
        modality=ds.get("Modality"),
        spacing=(float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])) if "PixelSpacing" in ds else None,
        thickness=float(ds.SliceThickness) if ds.get("SliceThickness") not in (None, "") else None,
        orientation=orientation,
    )


def _slice_position(ds, orientation: tuple[float, ...] | None) -> float | None:
    """Position along the slice normal: robust to tilted series, unlike the raw z coordinate."""
    if "ImagePositionPatient" in ds and orientation is not None and len(orientation) == 6:
        normal = np.cross(np.asarray(orientation[:3]), np.asarray(orientation[3:]))
        return float(np.dot(normal, np.asarray([float(v) for v in ds.ImagePositionPatient])))
    if ds.get("SliceLocation") not in (None, ""):
        return float(ds.SliceLocation)
    return None


@dataclass
class Volume:
    hu: np.ndarray  # float32 (D, H, W), slice order head-to-feet as sorted by position
    spacing: tuple[float, float, float] | None  # (z, y, x) mm
    source: str


def _series_headers(
    folder: Path, allowed_modalities: tuple[str, ...]
) -> tuple[list[tuple[Path, DicomSlice]], tuple[float, float, float] | None]:
    """Validate a series from its headers alone; return its files in slice order and its spacing."""
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and (p.suffix.lower() in DICOM_EXTENSIONS or not p.suffix)
    )
    if not files:
        raise DataError(f"{folder}: no DICOM files (*.dcm) in this series folder")
    slices = [(f, read_dicom(f, pixels=False)) for f in files]
    modalities = {s.modality for _, s in slices if s.modality}
    bad = modalities - set(allowed_modalities)
    if allowed_modalities and bad:
        raise DataError(
            f"{folder}: modality {sorted(bad)} is not {list(allowed_modalities)}; covidscan volumes expect CT series"
        )
    orientations = {tuple(round(v, 3) for v in s.orientation) for _, s in slices if s.orientation}
    if len(orientations) > 1:
        raise DataError(
            f"{folder}: slices have {len(orientations)} different orientations; split the "
            "folder into one series per orientation"
        )
    if any(s.position is None for _, s in slices):
        missing = next(str(f) for f, s in slices if s.position is None)
        raise DataError(f"{missing}: no ImagePositionPatient or SliceLocation; cannot order the series")
    slices.sort(key=lambda item: cast(float, item[1].position))  # None was rejected above
    positions = np.array([s.position for _, s in slices])
    gaps = np.diff(positions)
    if len(gaps) and np.any(np.isclose(gaps, 0)):
        raise DataError(f"{folder}: two slices share one position; duplicated files or two series in one folder")
    z = float(np.median(np.abs(gaps))) if len(gaps) else (slices[0][1].thickness or 1.0)
    if len(gaps) > 2 and np.max(np.abs(gaps)) > 1.5 * z + 1e-3:
        import warnings

        warnings.warn(
            f"{folder}: uneven slice spacing (median {z:.2f} mm, max {np.max(np.abs(gaps)):.2f} mm): "
            "slices may be missing",
            stacklevel=3,
        )
    first = slices[0][1]
    return slices, ((z, *first.spacing) if first.spacing else None)


def read_dicom_series(
    folder: str | Path, *, allowed_modalities: tuple[str, ...] = ("CT",), pixels: bool = True
) -> Volume:
    """Read every DICOM file in ``folder`` as one series, sorted by slice position, in HU.

    Headers are read and validated first, then slices are decoded straight into one preallocated
    (D, H, W) array, so peak memory is about the volume itself rather than twice it.
    ``pixels=False`` stops after the headers (``hu`` has shape (D, 0, 0)): it validates the series
    and gives its slice count and spacing cheaply, e.g. to index slice stacks before decoding.
    """
    folder = Path(folder)
    slices, spacing = _series_headers(folder, allowed_modalities)
    if not pixels:
        return Volume(np.zeros((len(slices), 0, 0), np.float32), spacing, str(folder))
    hu: np.ndarray | None = None
    for index, (file, _) in enumerate(slices):
        image = read_dicom(file).pixels
        if hu is None:
            hu = np.empty((len(slices), *image.shape), np.float32)
        elif image.shape != hu.shape[1:]:
            raise DataError(f"{file}: slice size {image.shape} differs from the series' {hu.shape[1:]}; not one series")
        hu[index] = image
    if hu is None:
        raise DataError(f"{folder}: no DICOM slices in this series folder")
    return Volume(hu, spacing, str(folder))


def read_middle_slice(path: str | Path) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The middle slice (HU) of a DICOM series folder or NIfTI file, and the volume's (D, H, W),
    decoding only that slice: enough to fingerprint a scan (``data audit``) without reading it all."""
    path = Path(path)
    if path.is_dir():
        slices, _ = _series_headers(path, ("CT",))
        middle = read_dicom(slices[len(slices) // 2][0]).pixels
        return middle, (len(slices), *middle.shape)
    if is_nifti(path):
        try:
            image = nifti_image(path)
            if len(image.shape) not in (2, 3):
                raise DataError(f"{path}: expected a 2D or 3D NIfTI volume, got shape {image.shape}")
            depth = image.shape[2] if len(image.shape) == 3 else 1
            data = image.dataobj[:, :, depth // 2] if len(image.shape) == 3 else image.dataobj
            middle = np.asarray(data, dtype=np.float32).T  # (x, y) -> (H, W), as read_nifti orients slices
        except DataError:
            raise
        except Exception as exc:  # nibabel raises ImageFileError, EOFError, zlib errors...
            raise DataError(f"{path}: not a readable NIfTI file ({exc})") from exc
        return middle, (depth, *middle.shape)
    raise DataError(f"{path}: a volume must be a DICOM series folder or a .nii/.nii.gz file")


def nifti_image(path: str | Path) -> SpatialImage:
    """nibabel's lazy image of a NIfTI file: the header is read, the voxels only when asked for."""
    import nibabel as nib
    from nibabel.spatialimages import SpatialImage

    image = nib.load(str(path))
    if not isinstance(image, SpatialImage):
        raise DataError(f"{path}: not a NIfTI volume (nibabel read it as {type(image).__name__})")
    return image


def read_nifti(path: str | Path) -> np.ndarray:
    """Read a NIfTI volume as float32 (D, H, W): nibabel's (x, y, z) is moved to slices-first."""
    path = Path(path)
    try:
        image = nifti_image(path)
        data = np.asarray(image.dataobj, dtype=np.float32)  # scl_slope/inter applied by nibabel
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as exc:  # nibabel raises ImageFileError, EOFError, zlib errors...
        raise DataError(f"{path}: not a readable NIfTI file ({exc})") from exc
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3D NIfTI volume, got shape {data.shape}")
    return np.ascontiguousarray(np.transpose(data, (2, 1, 0)))


def read_volume(path: str | Path) -> Volume:
    """A CT volume in HU from a DICOM series folder or a NIfTI file."""
    path = Path(path)
    if path.is_dir():
        return read_dicom_series(path)
    if is_nifti(path):
        zooms = nifti_image(path).header.get_zooms()[:3]
        return Volume(read_nifti(path), (float(zooms[2]), float(zooms[1]), float(zooms[0])), str(path))
    raise DataError(f"{path}: a volume must be a DICOM series folder or a .nii/.nii.gz file")
