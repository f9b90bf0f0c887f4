"""What a file is, from its first bytes: named in the error when a PNG, JPEG, HDF5 file... was
renamed to .tif by mistake, instead of tifffile's "not a TIFF file b'\\x89PNG...'"."""
from __future__ import annotations

OTHER_FORMATS = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
    (b"BM", "a BMP image"), (b"\x89HDF\r\n\x1a\n", "an HDF5 file"), (b"\x93NUMPY", "a NumPy .npy file"),
    (b"PK\x03\x04", "a zip archive"), (b"\x1f\x8b", "a gzip archive"),
)


def other_format(head: bytes) -> str | None:
    """The name of the known non-TIFF format ``head`` (a file's first 8 bytes) starts like, or None."""
    return next((name for magic, name in OTHER_FORMATS if head.startswith(magic)), None)
