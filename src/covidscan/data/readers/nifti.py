"""NIfTI volumes through nibabel, slices-first: nibabel's ``(x, y, z)`` becomes ``(D, H, W)``.

Values are taken as HU (``scl_slope``/``scl_inter`` applied by nibabel); spacing is ``(z, y, x)``
from the header's zooms. The declared shape is checked against the limits before the (possibly
gzip-compressed) data is read, so a small ``.nii.gz`` declaring a huge volume is refused cheaply.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from covidscan.config import ReadLimits
from covidscan.data.readers.base import SKIP_HINT, Header, Reader
from covidscan.data.records import DataError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


class NiftiReader(Reader):
    """A ``.nii`` / ``.nii.gz`` volume (2D or 3D) in HU."""

    name = "nifti"
    volumetric = True

    def verify_suffix(self, path: Path) -> bool:
        return is_nifti(path) and not path.is_dir()

    def read_header(self, path: Path, limits: ReadLimits) -> Header:
        image = _load(path)
        shape, zooms = image.header.get_data_shape(), image.header.get_zooms()
        if len(shape) not in (2, 3):
            raise DataError(f"{path}: expected a 2D or 3D NIfTI volume, got shape {shape}")
        x, y, z = (*shape, 1) if len(shape) == 2 else shape
        spacing = (float(zooms[2]) if len(zooms) > 2 else 1.0, float(zooms[1]), float(zooms[0]))
        return Header((z, y, x), is_hu=True, spacing=spacing, mode="NIfTI")

    def decode(self, path: Path, header: Header, limits: ReadLimits) -> np.ndarray:
        data = np.asarray(_load(path).dataobj, dtype=np.float32)
        if data.ndim == 2:
            data = data[:, :, None]
        return np.ascontiguousarray(np.transpose(data, (2, 1, 0)))

    def decode_slice(self, path: Path, header: Header, index: int, limits: ReadLimits) -> np.ndarray:
        proxy = _load(path).dataobj
        data = proxy[:, :, index] if len(proxy.shape) == 3 else proxy
        return np.ascontiguousarray(np.asarray(data, dtype=np.float32).T)


def _load(path: Path):
    import nibabel as nib

    try:
        return nib.load(str(path))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as exc:  # nibabel raises ImageFileError, EOFError, zlib errors...
        raise DataError(f"{path}: not a readable NIfTI file ({exc}); {SKIP_HINT}") from exc
